"""``python -m fused_attn`` runs the benchmark sweep (the same as ``python -m fused_attn.bench``)."""
import sys

from .bench import main

sys.exit(main())
