// Runs TVM-generated CUDA C for qwen2c's GPU kernels on the CPU: every block's threads run as real,
// concurrent std::threads, __syncthreads() is a std::barrier and __shared__ is one array per block
// (blocks run one after another). Catches indexing, guard and reduction mistakes exactly, and
// races where the interleaving exposes them. Compiled by tests/test_gpu_kernels_emulated.py with
// KINC naming the generated kernels (float32 builds of the kernels, renamed k_<name>).
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>
struct dim3_ { unsigned x = 0, y = 0, z = 0; };
static thread_local dim3_ threadIdx, blockIdx;
static std::barrier<>* g_bar = nullptr;
static inline void __syncthreads() { g_bar->arrive_and_wait(); }
#define __shared__ static
#define __restrict__ __restrict
static inline float max(float a, float b) { return a > b ? a : b; }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
#include KINC
static void launch(unsigned gx, unsigned gy, unsigned bx, unsigned by, const std::function<void()>& body) {
  for (unsigned y = 0; y < gy; ++y)
    for (unsigned x = 0; x < gx; ++x) {
      std::barrier<> bar(bx * by);
      g_bar = &bar;
      std::vector<std::thread> ts;
      for (unsigned ty = 0; ty < by; ++ty)
        for (unsigned tx = 0; tx < bx; ++tx)
          ts.emplace_back([=, &body] { threadIdx = {tx, ty, 0}; blockIdx = {x, y, 0}; body(); });
      for (auto& t : ts) t.join();
    }
}
// Entry points: grid and block sizes come from Python (the kernels' own constants).
extern "C" {
void route(int* ch, float* lg, float* w, int64_t t, int g, int b) { launch(g, 1, b, 1, [=] { k_route(ch, lg, w, t); }); }
void dense(int* ch, int* de, float* dw, float* w, int64_t t, int g, int b) {
  launch(g, 1, b, 1, [=] { k_dense(ch, de, dw, w, t); });
}
void group(int* ch, int* off, int* rows, int* so, int64_t s, int b) { launch(1, 1, b, 1, [=] { k_group(ch, off, rows, so, s); }); }
void swiglu(int* off, float* out, int* rows, float* w, float* x, int gx, int gy, int bx, int by) {
  launch(gx, gy, bx, by, [=] { k_swiglu(off, out, rows, w, x); });
}
void down(int* off, float* out, float* w, float* x, int gx, int gy, int bx, int by) {
  launch(gx, gy, bx, by, [=] { k_down(off, out, w, x); });
}
void combine(float* out, int* so, float* w, float* y, int64_t t, int64_t th, int g, int b) {
  launch(g, 1, b, 1, [=] { k_combine(out, so, w, y, th, t); });
}
void norm(float* out, float* w, float* x, int64_t rows, int b) { launch(rows, 1, b, 1, [=] { k_norm(out, w, x, rows); }); }
}
