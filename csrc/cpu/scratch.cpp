// The CPU scratch cache (scratch.h).
//
// Policy: a buffer is taken from the cache when one is large enough and at most twice the request
// (so one huge kept buffer is not tied up by a small request); otherwise a fresh one is allocated.
// Requests are rounded up to size classes, 8 per doubling (at most 12.5 % over), so a decoding
// loop whose KV cache grows by a key per step keeps asking for the same class and takes its
// buffers back. Handed-back buffers are kept while the total stays within the cap; past it, the
// buffers handed back longest ago are freed first.
#include "scratch.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#if defined(__unix__)
#include <pthread.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "../common/check.h"

namespace fused_attn::cpu::scratch {
namespace {

constexpr size_t kAlign = 64;
constexpr int64_t kDefaultCapMiB = 256;

// FUSED_ATTN_CPU_SCRATCH_MB: unset -> the default; else a whole number of MiB, >= 0.
size_t cap_bytes() {
  const long long mib = check::env_whole_number("FUSED_ATTN_CPU_SCRATCH_MB", 0, (1LL << 40) - 1,
                                                "of MiB >= 0 (0 keeps no buffers)");
  return size_t(mib < 0 ? kDefaultCapMiB : mib) << 20;
}

// The size class of a request: rounded up to 1/8 of its power of two (and to kAlign).
size_t size_class(size_t bytes) {
  bytes = std::max(bytes, kAlign);
  size_t top = 1;
  while (top < bytes) top <<= 1;
  const size_t step = std::max(top / 16, kAlign);  // classes top/2 + k * top/16, k = 1..8
  return (bytes + step - 1) / step * step;
}

void* allocate(size_t bytes) {
  void* p = std::aligned_alloc(kAlign, bytes);
  if (p == nullptr && release() > 0) p = std::aligned_alloc(kAlign, bytes);  // the kept buffers first
  FA_CHECK(p != nullptr, "fused_attn CPU scratch: out of memory allocating ", bytes, " bytes");
  return p;
}

struct Kept {
  void* data;
  size_t bytes;
};

struct Cache {
  std::mutex mutex;
  std::vector<Kept> kept;  // in the order they were handed back (erase keeps it): oldest first
  size_t kept_bytes = 0;
  size_t cap = 0;  // the cap read by the last take (give runs in destructors, where nothing may throw)
};

Cache& cache();

// Never destroyed: tensors over kept buffers may die during static destruction.
Cache* make_cache() {
  Cache* c = new Cache;
#if defined(__unix__)
  // A fork while another thread held the mutex would leave the child's copy locked forever
  // (DataLoader workers fork): the child starts with a fresh one; its kept buffers stay valid.
  pthread_atfork(nullptr, nullptr, [] { new (&cache().mutex) std::mutex(); });
#endif
  return c;
}

Cache& cache() {
  static Cache* c = make_cache();
  return *c;
}

// A buffer of at least `bytes` (a size class); *got receives its size.
void* take(size_t bytes, size_t* got) {
  const size_t want = size_class(bytes);
  const size_t cap = cap_bytes();
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    c.cap = cap;
    auto best = c.kept.end();
    for (auto it = c.kept.begin(); it != c.kept.end(); ++it)
      if (it->bytes >= want && it->bytes <= 2 * want && (best == c.kept.end() || it->bytes < best->bytes)) best = it;
    if (best != c.kept.end()) {
      void* p = best->data;
      *got = best->bytes;
      c.kept_bytes -= best->bytes;
      c.kept.erase(best);
      return p;
    }
  }
  *got = want;
  return allocate(want);
}

// Hands a buffer back: kept within the cap, else freed, with the oldest kept ones past the cap.
void give(void* data, size_t bytes) noexcept {
  std::vector<void*> to_free;
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (bytes > c.cap) {
      to_free.push_back(data);
    } else {
      c.kept.push_back({data, bytes});
      c.kept_bytes += bytes;
      while (c.kept_bytes > c.cap) {
        to_free.push_back(c.kept.front().data);
        c.kept_bytes -= c.kept.front().bytes;
        c.kept.erase(c.kept.begin());
      }
    }
  }
  for (void* p : to_free) std::free(p);
}

// torch.profiler's memory events (profile_memory=True) see a buffer while it is handed out, as
// they see the default CPU allocator's: not while it is kept (as CUDA's "reserved" memory).
void report(void* data, int64_t bytes) noexcept {
  if (c10::memoryProfilingEnabled())
    c10::reportMemoryUsageToProfiler(data, bytes, 0, 0, c10::Device(c10::DeviceType::CPU));
}

// Any buffer: those under kMinCachedBytes are malloc's (its heap serves them without faults).
void* obtain(size_t bytes, size_t* got) {
  void* data = nullptr;
  if (bytes >= kMinCachedBytes) {
    data = take(bytes, got);
  } else {
    *got = size_class(bytes);
    data = allocate(*got);
  }
  report(data, int64_t(*got));
  return data;
}

void hand_back(void* data, size_t bytes) noexcept {
  report(data, -int64_t(bytes));
  if (bytes >= kMinCachedBytes)
    give(data, bytes);
  else
    std::free(data);
}

}  // namespace

Block::Block(size_t bytes) { reserve(bytes); }

Block& Block::operator=(Block&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = other.data_;
    bytes_ = other.bytes_;
    other.data_ = nullptr;
  }
  return *this;
}

void Block::reset() noexcept {
  if (data_ != nullptr) hand_back(data_, bytes_);
  data_ = nullptr;
}

void Block::reserve(size_t bytes) {
  if (data_ != nullptr && bytes_ >= bytes) return;
  reset();
  data_ = obtain(bytes, &bytes_);
}

namespace {

// The tensors' allocator: a block from the cache and, as the DataPtr's context, a small record of
// where it is and how large (what the deleter hands back).
struct Owned {
  void* data;
  size_t bytes;
};

void delete_owned(void* context) {
  auto* owned = static_cast<Owned*>(context);
  hand_back(owned->data, owned->bytes);
  delete owned;
}

struct CacheAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    size_t got = 0;
    void* data = obtain(n, &got);
    return {data, new Owned{data, got}, &delete_owned, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

CacheAllocator cache_allocator;

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &cache_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

at::Tensor empty_like(const at::Tensor& x) {
  if (!x.is_non_overlapping_and_dense()) return at::empty_like(x);  // at::empty_like's own choice of layout
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &cache_allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type());
}

at::Tensor zeros(at::IntArrayRef sizes, at::ScalarType dtype) {
  at::Tensor t = empty(sizes, dtype);
  t.zero_();
  return t;
}

int64_t release() {
  std::vector<Kept> kept;
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    kept.swap(c.kept);
    c.kept_bytes = 0;
  }
  int64_t freed = 0;
  for (const Kept& k : kept) {
    freed += int64_t(k.bytes);
    std::free(k.data);
  }
  return freed;
}

}  // namespace fused_attn::cpu::scratch

// Takes no tensor, so it is registered as a catch-all kernel here rather than per dispatch key.
TORCH_LIBRARY_FRAGMENT(fused_attn_C, m) {
  m.def("cpu_scratch_release() -> int", &fused_attn::cpu::scratch::release);
}
