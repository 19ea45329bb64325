// A scoped caching CPU allocator for the CPU fast path (fastcount.inference.memory).
//
// Why: a forward pass at 256x256 allocates and frees activations of 20-70 MB per
// layer. glibc serves blocks over 32 MB with fresh mmap()s, so every pass pays a
// page fault plus kernel zeroing per 4 KiB of every large activation: measured
// 20-30% of the fp32 fast path's time. Inside a pool scope the process's CPU
// allocator is this one: large blocks freed by a pass are kept and handed to the
// next allocation they fit (best fit, up to 1.5x the request; shapes repeat from
// pass to pass), without touching the kernel. When the idle cap is reached, a
// returned block is freed instead of older ones (see give_back).
//
// Bounds: when the outermost scope ends, idle blocks no scope reused in the last
// kKeepScopes are freed, then the oldest idle blocks until the idle bytes are at
// most twice the largest working set (peak bytes handed out) of those scopes; the
// idle bytes never exceed a limit (default: a quarter of physical memory,
// set_limit), and release() frees everything idle. Small blocks go to the
// default allocator.
//
// Scopes nest and may be entered from several threads: the first entry installs
// the allocator, the last exit restores the previous one. A block's deleter
// always returns it here, so tensors may outlive the scope that allocated them.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <algorithm>
#include <array>
#include <iterator>
#include <cstdlib>
#include <mutex>
#include <map>
#include <unordered_map>
#include <vector>

#include "memory_pool.h"

namespace fastcount {
namespace pool {
namespace {

constexpr size_t kMinPooled = size_t(1) << 20;  // smaller blocks: glibc reuses them well already
constexpr size_t kHuge = size_t(2) << 20;       // THP size on x86-64
constexpr uint64_t kKeepScopes = 4;             // idle blocks survive this many scopes unused
constexpr size_t kFitSlack = 2;                 // best fit: a block up to 1/kFitSlack larger serves

// Transparent huge pages for big blocks: opt-in (FASTCOUNT_MEMORY_POOL_THP=1). Measured no
// steady-state gain, and with the common defrag=madvise setting the first touch of an
// advised block can stall in compaction.
bool use_thp() {
  static const bool on = [] {
    const char* v = std::getenv("FASTCOUNT_MEMORY_POOL_THP");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

struct Block {
  void* ptr;
  uint64_t epoch;  // scope epoch in which it was returned
  uint64_t stamp;  // return order (least recently returned goes first)
};

class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinPooled) return fallback()->allocate(n);
    const size_t size = round_up(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      // Best fit, up to 1.5x the request: a pass's buffers come in many nearby sizes (FFT
      // tiles vs spectra, 1086^2 vs 1073^2 maps). At 1024x1024 fp32, exact-size reuse hit
      // 3 of 31 allocations per pass under the idle cap, 1/8 slack 28, 1/2 slack 30.
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / kFitSlack) {
        const size_t got = it->first;
        p = it->second.back().ptr;
        it->second.pop_back();
        if (it->second.empty()) free_.erase(it);
        idle_bytes_ -= got;
        ++hits_;
        track(p, got);
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) {
      p = fresh(size);
      std::lock_guard<std::mutex> g(mu_);
      track(p, size);
    }
    return {p, p, &PoolAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &PoolAllocator::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void give_back(void* p) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = live_.find(p);
      if (it == live_.end()) {
        // A small block from the default allocator released through raw_deleter()
        // (raw_allocate / raw_deallocate callers): hand it back to its owner.
        fallback()->raw_deleter()(p);
        return;
      }
      const size_t size = it->second;
      live_.erase(it);
      live_bytes_ -= size;
      if (idle_bytes_ + size > limit_) {
        // Over the cap: drop the block being returned, not older ones. A pass allocates in
        // the same order every time; evicting the oldest would evict every block just
        // before its reuse once the cap is reached (LRU on a cyclic pattern).
        drop.push_back(p);
      } else {
        free_[size].push_back({p, epoch_, ++clock_});
        idle_bytes_ += size;
      }
    }
    for (void* q : drop) std::free(q);
  }

  void enter() {
    std::lock_guard<std::mutex> g(mu_);
    if (depth_++ == 0) {
      previous_ = c10::GetCPUAllocator();
      c10::SetCPUAllocator(this, 0);
      // Another allocator registered at a higher priority wins: then this scope is a no-op.
      installed_ = c10::GetCPUAllocator() == this;
      scope_peak_ = live_bytes_;
    }
  }

  void exit() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      TORCH_CHECK(depth_ > 0, "fastcount memory pool: exit without enter");
      if (--depth_ > 0) return;
      if (installed_) c10::SetCPUAllocator(previous_, 0);
      installed_ = false;
      peaks_[epoch_ % kKeepScopes] = scope_peak_;
      // Blocks the last kKeepScopes scopes did not reuse (an earlier input shape) go;
      // a few scopes, not one, so backends called in turn keep their blocks.
      for (auto it = free_.begin(); it != free_.end();) {
        auto& v = it->second;
        size_t keep = 0;
        for (const Block& b : v) {
          if (b.epoch + kKeepScopes <= epoch_) {
            drop.push_back(b.ptr);
            idle_bytes_ -= it->first;
          } else {
            v[keep++] = b;
          }
        }
        v.resize(keep);
        it = v.empty() ? free_.erase(it) : std::next(it);
      }
      const size_t working = *std::max_element(peaks_.begin(), peaks_.end());
      evict_to(std::min(limit_, 2 * working), drop);
      ++epoch_;
    }
    for (void* p : drop) std::free(p);
  }

  void release() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& kv : free_)
        for (const Block& b : kv.second) drop.push_back(b.ptr);
      free_.clear();
      idle_bytes_ = 0;
    }
    for (void* p : drop) std::free(p);
  }

  void set_limit(size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      limit_ = bytes;
      evict_to(limit_, drop);
    }
    for (void* p : drop) std::free(p);
  }

  Stats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {idle_bytes_, live_bytes_, hits_, misses_, depth_, limit_};
  }

 private:
  static void deleter(void* p);

  void track(void* p, size_t size) {  // mu_ held
    live_[p] = size;
    live_bytes_ += size;
    scope_peak_ = std::max(scope_peak_, live_bytes_);
  }

  // Move the least recently returned idle blocks to `drop` until idle_bytes_ <= cap (mu_ held; the
  // caller frees them after unlocking).
  void evict_to(size_t cap, std::vector<void*>& drop) {
    while (idle_bytes_ > cap) {
      std::vector<Block>* oldest = nullptr;
      size_t oldest_size = 0;
      size_t at = 0;
      for (auto& kv : free_) {
        for (size_t i = 0; i < kv.second.size(); ++i) {
          if (oldest == nullptr || kv.second[i].stamp < (*oldest)[at].stamp) {
            oldest = &kv.second;
            oldest_size = kv.first;
            at = i;
          }
        }
      }
      if (oldest == nullptr) break;
      drop.push_back((*oldest)[at].ptr);
      oldest->erase(oldest->begin() + static_cast<std::ptrdiff_t>(at));
      idle_bytes_ -= oldest_size;
      if (oldest->empty()) free_.erase(oldest_size);
    }
  }

  static size_t default_limit() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    if (pages <= 0 || page <= 0) return size_t(4) << 30;
    return static_cast<size_t>(pages) * static_cast<size_t>(page) / 4;
  }

  static c10::Allocator* fallback() { return c10::GetDefaultCPUAllocator(); }

  static size_t round_up(size_t n) {
    const size_t a = n >= kHuge ? kHuge : 4096;
    return (n + a - 1) / a * a;
  }

  static void* fresh(size_t size) {
    void* p = nullptr;
    const size_t align = size >= kHuge ? kHuge : 64;
    if (posix_memalign(&p, align, size) != 0 || p == nullptr) {
      TORCH_CHECK(false, "fastcount memory pool: out of memory allocating ", size, " bytes");
    }
#ifdef MADV_HUGEPAGE
    if (size >= kHuge && use_thp()) madvise(p, size, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
    return p;
  }

  std::mutex mu_;
  std::map<size_t, std::vector<Block>> free_;  // by block size, for best fit
  std::unordered_map<void*, size_t> live_;
  size_t idle_bytes_ = 0, live_bytes_ = 0, scope_peak_ = 0;
  std::array<size_t, kKeepScopes> peaks_{};  // working set of the last kKeepScopes scopes
  size_t limit_ = default_limit();
  uint64_t hits_ = 0, misses_ = 0, epoch_ = 1, clock_ = 0;
  int64_t depth_ = 0;
  bool installed_ = false;
  c10::Allocator* previous_ = nullptr;
};

// Never destroyed: blocks may be freed during interpreter shutdown.
PoolAllocator& instance() {
  static auto* a = new PoolAllocator();
  return *a;
}

void PoolAllocator::deleter(void* p) { instance().give_back(p); }

}  // namespace

void enter() { instance().enter(); }
void exit() { instance().exit(); }
void release() { instance().release(); }
void set_limit(size_t bytes) { instance().set_limit(bytes); }
Stats stats() { return instance().stats(); }

}  // namespace pool
}  // namespace fastcount
