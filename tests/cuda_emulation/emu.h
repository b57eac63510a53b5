// CPU emulation of the CUDA execution model, enough to run adaptsr's kernel headers (csrc/**/
// *_kernel.cuh) unchanged with g++, so that tests/test_cuda_kernels_emulated.py can check their
// numbers on machines without a GPU.
//
// What is emulated:
//   - every CUDA thread of a block is a fiber (ucontext) with its own stack, so per-thread locals
//     (accumulator arrays, loop state) behave as on the GPU; threadIdx / blockIdx / blockDim /
//     gridDim are set for the running fiber;
//   - __syncthreads() is a block-wide barrier over the threads still running (threads that
//     returned are dropped, as on current GPUs); a barrier that the live threads can never all
//     reach (one inside divergent code) raises an error instead of hanging;
//   - __shfl_xor_sync() exchanges values within a warp of 32 lanes (a warp barrier before and
//     after the exchange); __syncwarp() is a barrier over the warp's lanes;
//   - __shared__ variables are function statics: one copy, shared by the threads of the block,
//     reused by the next block (blocks run one after another);
//   - launch limits: at most 1024 threads, a multiple of 32, grid.y and grid.z <= 65535;
//   - nvcuda::wmma's 16 x 16 x 16 fragments and TF32's 16 x 16 x 8 (at the end of this file), with
//     the alignment and leading-dimension rules of load_matrix_sync and store_matrix_sync checked.
// Fibers run one at a time in a fixed order (ascending or descending thread index, see
// EmuSchedule) up to their next barrier: deterministic, and a missing __syncthreads between a
// write and a read of shared memory by other threads shows as a wrong result in one order or the
// other.
//
// What is NOT checked: memory ordering and visibility (every write is seen at once), data races
// that a barrier-to-barrier sequential schedule hides, blocks running concurrently (inter-block
// races, atomics), occupancy, register and shared-memory limits, real warp scheduling and
// independent thread scheduling within a warp, bank conflicts, speed, and the device's float
// arithmetic (fused multiply-adds, fast-math intrinsics): g++ rounds each operation of the same
// source on the CPU.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// -- CUDA keywords and built-in variables --

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The running fiber's indices and the launch's sizes (one OS thread runs every fiber).
inline Dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int min(int a, int b) { return a < b ? a : b; }

// CUDA's 16- and 8-byte vector types and bit-cast intrinsic.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

inline float __uint_as_float(unsigned bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 64 * 1024;

// Thread order within a block between barriers.
enum class Schedule { kAscending, kDescending };
inline Schedule g_schedule = Schedule::kAscending;

struct Barrier {
  int expected = 0;  // threads still running that take part
  int arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = false;
};

struct BlockState {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<float> warp_values;  // one slot per thread for the shuffles
  unsigned current = 0;
  uint64_t progress = 0;  // arrivals and exits: a sweep without any is a deadlock
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;  // set by a fiber that hit a misuse; the scheduler raises it
};
inline BlockState* g_block = nullptr;

inline void yield_to_scheduler() {
  BlockState& b = *g_block;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// From a fiber: report the misuse to the scheduler (exceptions must not leave a fiber) and park.
[[noreturn]] inline void fail(const std::string& message) {
  g_block->error = message;
  for (;;) yield_to_scheduler();
}

inline void release_if_complete(Barrier& bar) {
  if (bar.arrived > 0 && bar.arrived == bar.expected) {
    bar.arrived = 0;
    ++bar.generation;
  }
}

inline void arrive_and_wait(Barrier& bar) {
  const uint64_t generation = bar.generation;
  ++bar.arrived;
  ++g_block->progress;
  release_if_complete(bar);
  while (bar.generation == generation) yield_to_scheduler();
}

inline void fiber_entry() {
  BlockState& b = *g_block;
  b.body(b.body_arg);
  // The thread returned: later barriers no longer wait for it.
  const unsigned t = b.current;
  b.fibers[t].done = true;
  ++b.progress;
  --b.block_barrier.expected;
  release_if_complete(b.block_barrier);
  Barrier& warp = b.warp_barriers[t / kWarpSize];
  --warp.expected;
  release_if_complete(warp);
  // Returning resumes uc_link: the scheduler.
}

template <typename Kernel>
void run_body(void* kernel) {
  (*static_cast<Kernel*>(kernel))();
}

}  // namespace emu

inline void __syncthreads() { emu::arrive_and_wait(emu::g_block->block_barrier); }

inline void __syncwarp(unsigned /*mask: the kernels synchronise full warps*/ = 0xffffffffu) {
  emu::BlockState& b = *emu::g_block;
  emu::Barrier& bar = b.warp_barriers[threadIdx.x / emu::kWarpSize];
  if (bar.expected != emu::kWarpSize) emu::fail("__syncwarp in a warp with exited lanes");
  emu::arrive_and_wait(bar);
}

inline float __shfl_xor_sync(unsigned /*mask: the kernels shuffle full warps*/, float value, int lane_mask) {
  emu::BlockState& b = *emu::g_block;
  const unsigned t = threadIdx.x;
  const unsigned warp = t / emu::kWarpSize, lane = t % emu::kWarpSize;
  emu::Barrier& bar = b.warp_barriers[warp];
  if (bar.expected != emu::kWarpSize) emu::fail("__shfl_xor_sync in a warp with exited lanes");
  b.warp_values[t] = value;
  emu::arrive_and_wait(bar);  // every lane has written
  const float result = b.warp_values[warp * emu::kWarpSize + (lane ^ static_cast<unsigned>(lane_mask))];
  emu::arrive_and_wait(bar);  // every lane has read before anyone writes again
  return result;
}

// Runs kernel() (a lambda calling the __global__ function with its arguments) for every thread of
// every block of the grid, blocks in x, then y, then z order.
template <typename Kernel>
void emu_launch(Dim3 grid, unsigned threads, Kernel kernel) {
  using namespace emu;
  if (threads == 0 || threads > 1024 || threads % kWarpSize != 0)
    throw std::invalid_argument("emu_launch: " + std::to_string(threads) + " threads per block (want a multiple of 32, <= 1024)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::invalid_argument("emu_launch: invalid grid " + std::to_string(grid.x) + " x " + std::to_string(grid.y) +
                                " x " + std::to_string(grid.z));
  BlockState state;
  state.body = &run_body<Kernel>;
  state.body_arg = &kernel;
  state.fibers.resize(threads);
  for (Fiber& f : state.fibers) f.stack.reset(new char[kStackBytes]);
  state.warp_values.assign(threads, 0.f);
  g_block = &state;
  gridDim = grid;
  blockDim = Dim3{threads, 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = Dim3{x, y, z};
        state.block_barrier = Barrier{static_cast<int>(threads)};
        state.warp_barriers.assign(threads / kWarpSize, Barrier{kWarpSize});
        for (Fiber& f : state.fibers) {
          f.done = false;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = &state.scheduler;
          makecontext(&f.context, &fiber_entry, 0);
        }
        unsigned live = threads;
        while (live > 0) {
          const uint64_t before = state.progress;
          for (unsigned i = 0; i < threads; ++i) {
            const unsigned t = g_schedule == Schedule::kAscending ? i : threads - 1 - i;
            if (state.fibers[t].done) continue;
            state.current = t;
            threadIdx = Dim3{t, 0, 0};
            swapcontext(&state.scheduler, &state.fibers[t].context);
            if (!state.error.empty()) {
              g_block = nullptr;
              throw std::runtime_error("emu_launch: thread " + std::to_string(t) + ": " + state.error);
            }
            if (state.fibers[t].done) --live;
          }
          if (live > 0 && state.progress == before) {
            g_block = nullptr;
            throw std::runtime_error("emu_launch: deadlock in block (" + std::to_string(x) + ", " + std::to_string(y) +
                                     ", " + std::to_string(z) + "): " + std::to_string(live) +
                                     " threads wait at a barrier that not all of them reach");
          }
        }
      }
  g_block = nullptr;
}

// -- tensor-core matrix products (nvcuda::wmma): 16 x 16 x 16 tiles of 16-bit types, 16 x 16 x 8 of TF32 --
//
// Warp-collective on the GPU, each lane holding a slice of a tile in a layout the kernels never
// look at (they only load, multiply-accumulate and store whole fragments, and round TF32
// operands element by element). Here every lane holds the whole tile as floats (exact for
// 16-bit inputs) and does the whole product itself, so the result is the same whichever lanes
// run; the tensor cores' summation order inside one product is not reproduced (fp32 sums in k
// order here). TF32 operands are fp32 in memory and in the fragment; the kernel rounds them with
// __float_to_tf32, and mma_sync, as the hardware, reads only their top 19 bits (a kernel that
// forgets the rounding truncates instead, which the tests see).
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// The type a fragment of element type T is loaded from: T itself, fp32 for TF32.
template <typename T>
struct memory_type {
  using type = T;
};
template <>
struct memory_type<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  float x[num_elements];  // row-major [kRows][kCols]
  float& at(int i, int j) { return x[i * kCols + j]; }
  float at(int i, int j) const { return x[i * kCols + j]; }
};

// cvt.rna.tf32.f32: round to nearest with ties away from zero, keeping a 10-bit mantissa.
inline float __float_to_tf32(float value) {
  if (!std::isfinite(value)) return value;
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits = (bits + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&value, &bits, sizeof bits);
  return value;
}

// What the tensor cores read of a TF32 operand: its top 19 bits (sign, exponent, 10-bit mantissa).
inline float tf32_operand(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits &= 0xFFFFE000u;
  std::memcpy(&value, &bits, sizeof bits);
  return value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (float& e : f.x) e = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const typename memory_type<T>::type* ptr,
                             unsigned ldm) {
  using Frag = fragment<Use, M, N, K, T, Layout>;
  using Memory = typename memory_type<T>::type;
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) emu::fail("load_matrix_sync: pointer not 256-bit aligned");
  if (ldm % (16 / sizeof(Memory)) != 0) emu::fail("load_matrix_sync: ldm not a multiple of 16 bytes");
  for (int i = 0; i < Frag::kRows; ++i)
    for (int j = 0; j < Frag::kCols; ++j)
      f.at(i, j) = static_cast<float>(std::is_same_v<Layout, col_major> ? ptr[i + j * ldm] : ptr[i * ldm + j]);
}

// An accumulator from fp32 memory (the kernels keep running sums there between products).
template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm,
                             layout_t layout) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) emu::fail("load_matrix_sync: pointer not 256-bit aligned");
  if (ldm % 4 != 0) emu::fail("load_matrix_sync: ldm not a multiple of 16 bytes");
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) f.at(i, j) = layout == mem_col_major ? ptr[i + j * ldm] : ptr[i * ldm + j];
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  static_assert(std::is_same_v<TA, TB>, "mma_sync: both operands of one type");
  static_assert(!std::is_same_v<TA, precision::tf32> || K == 8, "TF32 tiles are 16 x 16 x 8");
  static_assert(std::is_same_v<TA, precision::tf32> || K == 16, "16-bit tiles are 16 x 16 x 16");
  constexpr bool kTf32 = std::is_same_v<TA, precision::tf32>;
  fragment<accumulator, M, N, K, float> out;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.at(i, j);
      for (int k = 0; k < K; ++k) {
        s += kTf32 ? tf32_operand(a.at(i, k)) * tf32_operand(b.at(k, j)) : a.at(i, k) * b.at(k, j);
      }
      out.at(i, j) = s;
    }
  d = out;
}

template <int M, int N, int K>
inline void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                              layout_t layout) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) emu::fail("store_matrix_sync: pointer not 256-bit aligned");
  if (ldm % 4 != 0) emu::fail("store_matrix_sync: ldm not a multiple of 16 bytes");
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (layout == mem_col_major ? ptr[i + j * ldm] : ptr[i * ldm + j]) = f.at(i, j);
}

}  // namespace wmma
}  // namespace nvcuda
