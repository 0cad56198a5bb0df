// cuemu runtime: the CUDA execution model on host threads (see tests/cuemu/__init__.py).
//
// A launch runs its blocks one after another in a seeded shuffled order. A block runs every CUDA
// thread as its own pthread. All scheduling state of a block sits behind one mutex; a blocked
// thread waits (on its warp's condition variable) until the scheduler marks it running again.
//
// Lane states: gated (serial schedule: waits for its warp's turn), running, at a barrier, at a
// warp collective, exited. Progress rules, applied after every transition:
//   - a barrier completes when every non-exited thread of the block waits at it;
//   - a warp collective completes when every lane of its mask has arrived (same op, mask, width);
//   - serial schedule: when no lane of the active warp runs, the next warp of a shuffled order
//     (reshuffled at every barrier) is released, so warps run one at a time between barriers and a
//     missing barrier shows as a read of another warp's not-yet-written shared memory;
//   - no thread running and some thread not exited = deadlock, reported with every thread's site.
// Errors (deadlock, a collective naming an exited lane or reading a lane outside its mask, lanes of
// one warp meeting different intrinsics, threads at different __syncthreads, a wait past the
// timeout) abort the block: every waiting thread unwinds with KernelAbort, and the launch throws
// std::runtime_error (RuntimeError in Python) naming the kernel's launch site and the block.
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuemu.h"

#ifndef CUEMU_STACK_KB
#define CUEMU_STACK_KB 512
#endif

namespace cuemu {
namespace {

struct KernelAbort {};  // unwinds an emulated thread after its block failed

enum class LaneState { kGated, kRunning, kBarrier, kCollective, kExited };

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kSyncwarp: return "__syncwarp";
  }
  return "?";
}

std::string site(const char* file, int line) {
  std::string f = file ? file : "?";
  return f + ":" + std::to_string(line);
}

std::string hex_mask(unsigned mask) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", mask);
  return buf;
}

struct Collective {
  WarpOp op;
  unsigned mask;
  int width;
  int size;
  const char* file;
  int line;
  unsigned arrived = 0;
  uint64_t values[32] = {};
  int params[32] = {};
};

struct Warp {
  std::condition_variable cv;
  std::vector<Collective> open;
  uint64_t result[32] = {};
};

struct Lane {
  LaneState state = LaneState::kGated;
  const char* file = nullptr;
  int line = 0;
  WarpOp op = WarpOp::kSyncwarp;
};

struct Block {
  std::mutex mu;
  std::condition_variable done_cv;
  int nthreads = 0;
  int nwarps = 0;
  std::vector<Lane> lanes;
  std::unique_ptr<Warp[]> warps;
  int live = 0, running = 0, at_barrier = 0, exited = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  bool serial = true;
  int active_warp = -1;
  std::vector<int> order;
  size_t order_pos = 0;
  std::mt19937_64 rng;
  std::atomic<bool> failed{false};
  std::string error;
  double timeout_s = 60.0;
  uint64_t serial_id = 0;
  ThreadContext base;
  void (*run)(void*) = nullptr;
  void* closure = nullptr;
};

thread_local Block* t_block = nullptr;
thread_local int t_tid = -1;
thread_local ThreadContext t_ctx;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local sigjmp_buf t_fault_jump;  // where a kernel thread lands after touching a guard page
thread_local bool t_fault_armed = false;

// ---- guarded "device" buffers: data flush against a PROT_NONE page, so a read or write past the
// end faults; the fault in a kernel thread becomes an error of its launch, not a crash.
struct Guarded {
  char* base;       // mmap'd region start
  size_t mapped;    // region bytes (data pages + one guard page)
  char* data;       // data start (end of data == guard page start)
  size_t bytes;
};
std::mutex g_guard_mu;
std::vector<Guarded> g_guarded;

std::string describe_fault(uintptr_t addr) {
  std::lock_guard<std::mutex> lock(g_guard_mu);
  for (const Guarded& g : g_guarded) {
    const uintptr_t end = uintptr_t(g.data) + g.bytes;
    if (addr >= end && addr < uintptr_t(g.base) + g.mapped) {
      return "out-of-bounds access " + std::to_string(addr - end) + " bytes past the end of a " +
             std::to_string(g.bytes) + "-byte buffer";
    }
  }
  return "segmentation fault at address " + std::to_string(addr);
}

thread_local uintptr_t t_fault_addr = 0;
struct sigaction g_previous_segv;

void on_segv(int sig, siginfo_t* info, void* context) {
  if (t_fault_armed) {
    t_fault_armed = false;
    t_fault_addr = reinterpret_cast<uintptr_t>(info->si_addr);
    siglongjmp(t_fault_jump, 1);
  }
  // Not an emulated CUDA thread: the previous handler (or the default action) takes it.
  sigaction(SIGSEGV, &g_previous_segv, nullptr);
  (void)sig;
  (void)context;
}

void install_segv_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_previous_segv);
  });
}

std::mutex g_launch_mu;  // one launch at a time
std::mt19937_64 g_rng(0);
bool g_seeded = false;
std::atomic<uint64_t> g_launches{0}, g_blocks{0}, g_threads{0}, g_block_serial{0};
std::mutex g_shared_mu;
std::map<void*, uint64_t> g_shared_owner;  // __shared__ storage -> block that initialised it

double env_double(const char* name, double fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atof(v) : fallback;
}

// ---- state transitions (all with b.mu held) ----------------------------------------------------
void set_error(Block& b, const std::string& msg) {
  if (b.failed.load()) return;
  b.error = msg;
  b.failed.store(true);
  for (int w = 0; w < b.nwarps; ++w) b.warps[w].cv.notify_all();
}

void set_running(Block& b, int tid) {
  b.lanes[tid].state = LaneState::kRunning;
  ++b.running;
}

bool warp_has(const Block& b, int w, LaneState s) {
  for (int t = w * 32; t < std::min(b.nthreads, w * 32 + 32); ++t)
    if (b.lanes[t].state == s) return true;
  return false;
}

void release_barrier(Block& b) {
  for (int t = 0; t < b.nthreads; ++t) {
    if (b.lanes[t].state != LaneState::kBarrier) continue;
    if (b.serial) {
      b.lanes[t].state = LaneState::kGated;
    } else {
      set_running(b, t);
    }
  }
  b.at_barrier = 0;
  b.barrier_file = nullptr;
  if (b.serial) {  // a new phase: warps run one at a time in a fresh order
    std::shuffle(b.order.begin(), b.order.end(), b.rng);
    b.order_pos = 0;
    b.active_warp = -1;
  }
  for (int w = 0; w < b.nwarps; ++w) b.warps[w].cv.notify_all();
}

void schedule_next_warp(Block& b) {
  if (b.active_warp >= 0 &&
      (warp_has(b, b.active_warp, LaneState::kRunning) || warp_has(b, b.active_warp, LaneState::kCollective))) {
    return;
  }
  while (b.order_pos < b.order.size()) {
    const int w = b.order[b.order_pos++];
    if (!warp_has(b, w, LaneState::kGated)) continue;
    for (int t = w * 32; t < std::min(b.nthreads, w * 32 + 32); ++t)
      if (b.lanes[t].state == LaneState::kGated) set_running(b, t);
    b.active_warp = w;
    b.warps[w].cv.notify_all();
    return;
  }
  b.active_warp = -1;
}

std::string describe_threads(const Block& b) {
  // Consecutive threads in the same state at the same site are grouped: "threads 0-31 at ...".
  std::ostringstream out;
  auto label = [&](int t) {
    const Lane& l = b.lanes[t];
    switch (l.state) {
      case LaneState::kGated: return std::string("not scheduled");
      case LaneState::kRunning: return std::string("running");
      case LaneState::kExited: return std::string("exited");
      case LaneState::kBarrier: return "at __syncthreads (" + site(l.file, l.line) + ")";
      case LaneState::kCollective: return std::string("at ") + op_name(l.op) + " (" + site(l.file, l.line) + ")";
    }
    return std::string("?");
  };
  int start = 0;
  for (int t = 1; t <= b.nthreads; ++t) {
    if (t < b.nthreads && label(t) == label(start)) continue;
    out << (start ? "; " : "") << "threads " << start << "-" << (t - 1) << " " << label(start);
    start = t;
  }
  return out.str();
}

// Completes barriers / switches warps after a thread blocked or exited; then, if nothing can run,
// the block is deadlocked.
void after_transition(Block& b) {
  if (b.failed.load()) return;
  if (b.live > 0 && b.at_barrier == b.live) release_barrier(b);
  if (b.serial) schedule_next_warp(b);
  if (b.running == 0 && b.live > 0) set_error(b, "deadlock: no thread can proceed: " + describe_threads(b));
}

void wait_until_running(Block& b, std::unique_lock<std::mutex>& lock, const char* what) {
  Warp& warp = b.warps[t_tid / 32];
  auto ready = [&] { return b.failed.load() || b.lanes[t_tid].state == LaneState::kRunning; };
  const auto timeout = std::chrono::duration<double>(b.timeout_s);
  if (!warp.cv.wait_for(lock, timeout, ready)) {
    set_error(b, std::string("timed out after ") + std::to_string(b.timeout_s) + " s: thread " +
                     std::to_string(t_tid) + " waiting " + what + "; " + describe_threads(b));
  }
  if (b.failed.load()) throw KernelAbort{};
}

void fail_here(Block& b, const std::string& msg) {
  set_error(b, msg);
  throw KernelAbort{};
}

void complete_collective(Block& b, Warp& warp, size_t index) {
  const Collective c = warp.open[index];
  warp.open.erase(warp.open.begin() + long(index));
  const int width = c.width;
  uint64_t vote_ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((c.mask >> l) & 1u) vote_ballot |= (c.values[l] ? 1ull : 0ull) << l;
  const uint64_t size_mask = c.size >= 8 ? ~0ull : ((1ull << (8 * c.size)) - 1);
  for (int l = 0; l < 32; ++l) {
    if (!((c.mask >> l) & 1u)) continue;
    const int seg = l & ~(width - 1);
    int src = l;
    switch (c.op) {
      case WarpOp::kShflIdx: src = seg + (c.params[l] & (width - 1)); break;
      case WarpOp::kShflUp: src = l - c.params[l] >= seg ? l - c.params[l] : l; break;
      case WarpOp::kShflDown: src = l + c.params[l] < seg + width ? l + c.params[l] : l; break;
      case WarpOp::kShflXor: src = (l ^ c.params[l]) < seg + width ? (l ^ c.params[l]) : l; break;
      default: break;
    }
    uint64_t result = 0;
    switch (c.op) {
      case WarpOp::kBallot: result = vote_ballot; break;
      case WarpOp::kAny: result = vote_ballot != 0; break;
      case WarpOp::kAll: result = vote_ballot == c.mask; break;
      case WarpOp::kSyncwarp: break;
      default:
        if (!((c.mask >> src) & 1u)) {
          const int warp_index = int(&warp - &b.warps[0]);
          set_error(b, std::string(op_name(c.op)) + " at " + site(c.file, c.line) + ": lane " + std::to_string(l) +
                           " of warp " + std::to_string(warp_index) + " reads lane " + std::to_string(src) +
                           ", which is outside the mask " + hex_mask(c.mask) + " (undefined value on a GPU)");
          return;
        }
        result = c.values[src] & size_mask;
    }
    warp.result[l] = result;
  }
  const int base = int(&warp - &b.warps[0]) * 32;
  for (int l = 0; l < 32; ++l)
    if ((c.mask >> l) & 1u) set_running(b, base + l);
  warp.cv.notify_all();
}

// A lane that exits or waits elsewhere while lanes wait for it at a collective.
void check_collectives_for(Block& b, int tid, const char* doing) {
  Warp& warp = b.warps[tid / 32];
  const int lane = tid % 32;
  for (const Collective& c : warp.open) {
    if ((c.mask >> lane) & 1u) {
      set_error(b, std::string(op_name(c.op)) + " at " + site(c.file, c.line) + " with mask " + hex_mask(c.mask) +
                       ": lane " + std::to_string(lane) + " of warp " + std::to_string(tid / 32) + " " + doing +
                       " instead of joining it");
      return;
    }
  }
}

struct ThreadStart {
  Block* block;
  int tid;
};

void* thread_entry(void* arg) {
  const ThreadStart start = *static_cast<ThreadStart*>(arg);
  Block& b = *start.block;
  t_block = &b;
  t_tid = start.tid;
  t_ctx = b.base;
  const unsigned bx = b.base.block_dim.x, by = b.base.block_dim.y;
  t_ctx.thread_idx = make_uint3(unsigned(start.tid) % bx, (unsigned(start.tid) / bx) % by,
                                unsigned(start.tid) / (bx * by));
  try {
    {
      std::unique_lock<std::mutex> lock(b.mu);
      wait_until_running(b, lock, "for its warp's turn");
    }
    if (sigsetjmp(t_fault_jump, 1) == 0) {
      t_fault_armed = true;
      b.run(b.closure);
      t_fault_armed = false;
    } else {  // the kernel touched a guard page (see Guarded)
      const std::string what = describe_fault(t_fault_addr);
      std::lock_guard<std::mutex> lock(b.mu);
      set_error(b, "thread " + std::to_string(start.tid) + ": " + what);
    }
  } catch (const KernelAbort&) {
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(b.mu);
    set_error(b, std::string("exception in thread ") + std::to_string(start.tid) + ": " + e.what());
  } catch (...) {
    std::lock_guard<std::mutex> lock(b.mu);
    set_error(b, "unknown exception in thread " + std::to_string(start.tid));
  }
  t_fault_armed = false;
  std::lock_guard<std::mutex> lock(b.mu);
  Lane& me = b.lanes[start.tid];
  if (me.state == LaneState::kRunning) --b.running;
  if (me.state == LaneState::kBarrier) --b.at_barrier;
  me.state = LaneState::kExited;
  --b.live;
  check_collectives_for(b, start.tid, "exited");
  after_transition(b);
  if (++b.exited == b.nthreads) b.done_cv.notify_all();
  t_block = nullptr;
  return nullptr;
}

std::string dim_str(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

bool valid_config(const LaunchConfig& c) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (c.block.x == 0 || c.block.y == 0 || c.block.z == 0) return false;
  if (c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64 || threads > 1024) return false;
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0) return false;
  if (c.grid.x > 0x7fffffffu || c.grid.y > 65535 || c.grid.z > 65535) return false;
  if (c.shared_bytes > 48 * 1024) return false;  // above needs cudaFuncSetAttribute opt-in
  return true;
}

void run_block(Block& b) {
  std::vector<pthread_t> threads(size_t(b.nthreads));
  std::vector<ThreadStart> starts(size_t(b.nthreads));
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, size_t(CUEMU_STACK_KB) * 1024);
  int created = 0;
  for (int t = 0; t < b.nthreads; ++t) {
    starts[size_t(t)] = ThreadStart{&b, t};
    if (pthread_create(&threads[size_t(t)], &attr, thread_entry, &starts[size_t(t)]) != 0) {
      std::lock_guard<std::mutex> lock(b.mu);
      set_error(b, "pthread_create failed for thread " + std::to_string(t));
      // threads never created count as exited
      for (int u = t; u < b.nthreads; ++u) {
        Lane& l = b.lanes[size_t(u)];
        if (l.state == LaneState::kRunning) --b.running;
        l.state = LaneState::kExited;
        --b.live;
        ++b.exited;
      }
      break;
    }
    ++created;
  }
  pthread_attr_destroy(&attr);
  {
    std::unique_lock<std::mutex> lock(b.mu);
    const auto limit = std::chrono::duration<double>(2 * b.timeout_s + 10);
    if (!b.done_cv.wait_for(lock, limit, [&] { return b.exited == b.nthreads; })) {
      // A thread that neither exits nor waits (an endless loop) cannot be stopped: end the process
      // rather than hang the test run.
      std::fprintf(stderr, "cuemu: block did not finish within %.0f s (%s); exiting\n", limit.count(),
                   describe_threads(b).c_str());
      std::fflush(stderr);
      _exit(124);
    }
  }
  for (int t = 0; t < created; ++t) pthread_join(threads[size_t(t)], nullptr);
}

}  // namespace

// ---- API used by cuemu.h ---------------------------------------------------------------------
const ThreadContext& this_thread() {
  if (t_block == nullptr) {
    std::fprintf(stderr, "cuemu: a CUDA built-in (threadIdx, ...) was read outside a kernel\n");
    std::abort();
  }
  if (t_block->failed.load(std::memory_order_relaxed)) throw KernelAbort{};
  return t_ctx;
}

void check_launch_bounds(long long max_threads, const char* file, int line) {
  const ThreadContext& c = this_thread();
  const long long threads = (long long)c.block_dim.x * c.block_dim.y * c.block_dim.z;
  if (threads > max_threads) {
    Block& b = *t_block;
    std::lock_guard<std::mutex> lock(b.mu);
    set_error(b, "a block of " + std::to_string(threads) + " threads exceeds __launch_bounds__(" +
                     std::to_string(max_threads) + ") of the kernel at " + site(file, line) +
                     " (on a GPU: too many resources requested for launch)");
    throw KernelAbort{};
  }
}

void syncthreads(const char* file, int line) {
  Block& b = *t_block;
  std::unique_lock<std::mutex> lock(b.mu);
  if (b.failed.load()) throw KernelAbort{};
  if (b.at_barrier > 0 && (b.barrier_line != line || std::string(b.barrier_file) != file)) {
    fail_here(b, "threads of one block wait at different __syncthreads: " + site(b.barrier_file, b.barrier_line) +
                     " and " + site(file, line) + " (thread " + std::to_string(t_tid) + ")");
  }
  check_collectives_for(b, t_tid, ("waits at __syncthreads (" + site(file, line) + ")").c_str());
  if (b.failed.load()) throw KernelAbort{};
  if (b.at_barrier == 0) {
    b.barrier_file = file;
    b.barrier_line = line;
  }
  Lane& me = b.lanes[size_t(t_tid)];
  me.state = LaneState::kBarrier;
  me.file = file;
  me.line = line;
  --b.running;
  ++b.at_barrier;
  after_transition(b);
  wait_until_running(b, lock, ("at __syncthreads (" + site(file, line) + ")").c_str());
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t bits, int size, int param, int width, const char* file,
                         int line) {
  Block& b = *t_block;
  const int tid = t_tid, lane = tid % 32, w = tid / 32;
  std::unique_lock<std::mutex> lock(b.mu);
  if (b.failed.load()) throw KernelAbort{};
  const std::string where = std::string(op_name(op)) + " at " + site(file, line);
  if (!((mask >> lane) & 1u)) {
    fail_here(b, where + ": lane " + std::to_string(lane) + " of warp " + std::to_string(w) +
                     " is not in its own mask " + hex_mask(mask));
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail_here(b, where + ": width " + std::to_string(width) + " is not a power of two in [1, 32]");
  }
  Warp& warp = b.warps[size_t(w)];
  size_t index = warp.open.size();
  for (size_t i = 0; i < warp.open.size(); ++i) {
    const Collective& c = warp.open[i];
    if (c.mask == mask) {
      if (c.op != op || c.width != width || c.size != size) {
        fail_here(b, "lanes of warp " + std::to_string(w) + " meet different warp intrinsics: " + op_name(c.op) +
                         " (width " + std::to_string(c.width) + ") at " + site(c.file, c.line) + " and " + where +
                         " (width " + std::to_string(width) + ", lane " + std::to_string(lane) + ")");
      }
      index = i;
    } else if (c.mask & mask) {
      fail_here(b, "lanes of warp " + std::to_string(w) + " meet warp intrinsics with overlapping masks: " +
                       op_name(c.op) + " at " + site(c.file, c.line) + " mask " + hex_mask(c.mask) + " and " + where +
                       " mask " + hex_mask(mask));
    }
  }
  if (index == warp.open.size()) {
    Collective c;
    c.op = op;
    c.mask = mask;
    c.width = width;
    c.size = size;
    c.file = file;
    c.line = line;
    warp.open.push_back(c);
  }
  Collective& c = warp.open[index];
  c.values[lane] = bits;
  c.params[lane] = param;
  c.arrived |= 1u << lane;
  Lane& me = b.lanes[size_t(tid)];
  me.state = LaneState::kCollective;
  me.file = file;
  me.line = line;
  me.op = op;
  --b.running;
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const int t = w * 32 + l;
    if (t >= b.nthreads || b.lanes[size_t(t)].state == LaneState::kExited) {
      fail_here(b, where + " with mask " + hex_mask(mask) + ": lane " + std::to_string(l) + " of warp " +
                       std::to_string(w) + (t >= b.nthreads ? " does not exist (block too small)" : " has exited"));
    }
    if (b.lanes[size_t(t)].state == LaneState::kBarrier) {
      fail_here(b, where + " with mask " + hex_mask(mask) + ": lane " + std::to_string(l) + " of warp " +
                       std::to_string(w) + " waits at __syncthreads (" +
                       site(b.lanes[size_t(t)].file, b.lanes[size_t(t)].line) + ") instead");
    }
  }
  if (c.arrived == mask) {
    complete_collective(b, warp, index);
  }
  after_transition(b);
  wait_until_running(b, lock, ("at " + where).c_str());
  return warp.result[lane];
}

void shared_block_init(void* storage, size_t bytes) {
  const uint64_t id = t_block->serial_id;
  std::lock_guard<std::mutex> lock(g_shared_mu);
  uint64_t& owner = g_shared_owner[storage];
  if (owner != id) {
    std::memset(storage, 0xff, bytes);
    owner = id;
  }
}

void launch_grid(const LaunchConfig& config, void (*run)(void*), void* closure) {
  std::lock_guard<std::mutex> launch_lock(g_launch_mu);
  if (!valid_config(config)) {
    t_last_error = cudaErrorInvalidConfiguration;  // what the CUDA runtime reports
    return;
  }
  install_segv_handler();
  if (!g_seeded) {
    g_rng.seed(uint64_t(env_double("CUEMU_SEED", 0)));
    g_seeded = true;
  }
  const char* mode = std::getenv("CUEMU_SCHEDULE");
  const bool serial = !(mode && std::string(mode) == "free");
  const double timeout_s = env_double("CUEMU_TIMEOUT_S", 60.0);
  ++g_launches;
  const uint64_t nblocks = uint64_t(config.grid.x) * config.grid.y * config.grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), g_rng);  // nothing may depend on block order
  const int nthreads = int(config.block.x * config.block.y * config.block.z);
  for (uint64_t linear : order) {
    Block b;
    b.nthreads = nthreads;
    b.nwarps = (nthreads + 31) / 32;
    b.lanes.assign(size_t(nthreads), Lane{});
    b.warps.reset(new Warp[size_t(b.nwarps)]);
    b.live = nthreads;
    b.serial = serial;
    b.timeout_s = timeout_s;
    b.rng.seed(g_rng());
    b.serial_id = ++g_block_serial;
    b.order.resize(size_t(b.nwarps));
    for (int w = 0; w < b.nwarps; ++w) b.order[size_t(w)] = w;
    std::shuffle(b.order.begin(), b.order.end(), b.rng);
    const unsigned gx = config.grid.x, gy = config.grid.y;
    b.base.block_idx = make_uint3(unsigned(linear % gx), unsigned((linear / gx) % gy), unsigned(linear / (uint64_t(gx) * gy)));
    b.base.block_dim = config.block;
    b.base.grid_dim = config.grid;
    b.run = run;
    b.closure = closure;
    if (serial) {
      schedule_next_warp(b);
    } else {
      for (int t = 0; t < nthreads; ++t) set_running(b, t);
    }
    ++g_blocks;
    g_threads += uint64_t(nthreads);
    run_block(b);
    if (b.failed.load()) {
      throw std::runtime_error("cuemu: kernel launched at " + site(config.site.file, config.site.line) +
                               " (grid " + dim_str(config.grid) + ", block " + dim_str(config.block) +
                               ") failed in block " + dim_str(dim3(b.base.block_idx.x, b.base.block_idx.y,
                                                                   b.base.block_idx.z)) + ": " + b.error);
    }
  }
}

}  // namespace cuemu

// ---- the CUDA runtime calls the host code makes ----------------------------------------------
extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = cuemu::t_last_error;
  cuemu::t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return cuemu::t_last_error; }
const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidValue: return "invalid argument";
    default: return "unknown error";
  }
}

// Control and statistics, reached from Python with ctypes on the loaded module's file.
__attribute__((visibility("default"))) void cuemu_set_seed(uint64_t seed) {
  std::lock_guard<std::mutex> lock(cuemu::g_launch_mu);
  cuemu::g_rng.seed(seed);
  cuemu::g_seeded = true;
}
// A buffer of `bytes` whose end touches a PROT_NONE page (for test inputs); nullptr on failure.
__attribute__((visibility("default"))) void* cuemu_alloc_guarded(size_t bytes) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t data_pages = (bytes + page - 1) / page;
  const size_t mapped = (data_pages + 1) * page;
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return nullptr;
  char* guard = static_cast<char*>(base) + data_pages * page;
  if (mprotect(guard, page, PROT_NONE) != 0) {
    munmap(base, mapped);
    return nullptr;
  }
  char* data = guard - bytes;
  std::lock_guard<std::mutex> lock(cuemu::g_guard_mu);
  cuemu::g_guarded.push_back(cuemu::Guarded{static_cast<char*>(base), mapped, data, bytes});
  return data;
}
__attribute__((visibility("default"))) void cuemu_free_guarded(void* data) {
  std::lock_guard<std::mutex> lock(cuemu::g_guard_mu);
  for (size_t i = 0; i < cuemu::g_guarded.size(); ++i) {
    if (cuemu::g_guarded[i].data == data) {
      munmap(cuemu::g_guarded[i].base, cuemu::g_guarded[i].mapped);
      cuemu::g_guarded.erase(cuemu::g_guarded.begin() + long(i));
      return;
    }
  }
}
__attribute__((visibility("default"))) void cuemu_stats(uint64_t* out) {
  out[0] = cuemu::g_launches.load();
  out[1] = cuemu::g_blocks.load();
  out[2] = cuemu::g_threads.load();
}
}
