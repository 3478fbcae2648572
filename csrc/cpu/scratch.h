// A small cache of the large scratch buffers of the CPU attention kernels (their operand panels),
// reused from call to call.
//
// Why: the register-blocked products lay K and V (and, backward, Q, dO) out as panels in buffers
// of the operands' size, on every call. Buffers that large are served by glibc through mmap and
// returned through munmap, so every call faulted its buffers in afresh, page by page, each page
// zeroed by the kernel: with B4 H8 Lk4096 D64 float32 that was ~20 ms of a 52 ms forward, 2/3 of a
// 30 ms call with 16 queries per head (measured here, 2 cores of a Zen 4: README "CPU scratch").
// Buffers handed back are kept, up to a cap, and the next call that needs as much takes one back:
// its pages are already mapped.
//
// The cap is FUSED_ATTN_CPU_SCRATCH_MB (MiB, read when a buffer is handed back; default 256; 0
// keeps nothing, as before); fused_attn.empty_cpu_cache() (the op fused_attn_C::cpu_scratch_release)
// frees what is kept, and so does an allocation that fails, before it tries once more. Buffers
// under kMinCachedBytes bypass the cache: malloc serves those from its heap without faults.
// Thread-safe (one mutex, taken twice per buffer; a forked child starts with a fresh one).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

namespace fused_attn::cpu::scratch {

constexpr size_t kMinCachedBytes = size_t{1} << 20;

// A buffer of at least `bytes`, 64-byte aligned, uninitialised; handed back when destroyed.
class Block {
 public:
  Block() = default;
  explicit Block(size_t bytes);
  Block(Block&& other) noexcept : data_(other.data_), bytes_(other.bytes_) { other.data_ = nullptr; }
  Block& operator=(Block&& other) noexcept;
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  ~Block() { reset(); }
  void* data() const { return data_; }
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }
  // Makes room for at least `bytes` (keeping nothing of the old contents).
  void reserve(size_t bytes);

 private:
  void reset() noexcept;  // hands the buffer back
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// An uninitialised contiguous CPU tensor whose memory comes from the cache, through a
// c10::Allocator: an ordinary, resizable storage whose block goes back to the cache when it dies.
// For the kernels' own buffers (panels, layouts) and for the ops' outputs alike: a training loop's
// outputs, freed and allocated again every step, stop faulting their pages in too (glibc had
// returned them to the system whenever a step's small buffers, a norm's per-row statistics, landed
// on top of the heap past its trim threshold).
at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype);
// The same, zero-filled.
at::Tensor zeros(at::IntArrayRef sizes, at::ScalarType dtype);
// at::empty_like(x) (x's sizes, dtype and, when x is dense, its strides) from the cache; a
// non-dense x gets at::empty_like's own tensor.
at::Tensor empty_like(const at::Tensor& x);

// Frees every kept buffer; returns the bytes freed.
int64_t release();

}  // namespace fused_attn::cpu::scratch
