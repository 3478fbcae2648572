"""Integrations with other libraries: Hugging Face transformers (``huggingface``) and stand-ins for
code written for FlashAttention (``flash_attn``) and xformers (``xformers``)."""
