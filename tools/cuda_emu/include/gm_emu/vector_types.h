// CUDA's built-in vector types (the ones gm's kernels use, and their usual neighbours), with CUDA's alignment.
#pragma once

#define GM_EMU_VEC2(T, N, A)                        \
  struct alignas(A) N##2 { T x, y; };               \
  inline N##2 make_##N##2(T a, T b) { return {a, b}; }
#define GM_EMU_VEC4(T, N, A)                        \
  struct alignas(A) N##4 { T x, y, z, w; };         \
  inline N##4 make_##N##4(T a, T b, T c, T d) { return {a, b, c, d}; }

GM_EMU_VEC2(int, int, 8)
GM_EMU_VEC4(int, int, 16)
GM_EMU_VEC2(unsigned, uint, 8)
GM_EMU_VEC4(unsigned, uint, 16)
GM_EMU_VEC2(float, float, 8)
GM_EMU_VEC4(float, float, 16)
GM_EMU_VEC2(double, double, 16)
GM_EMU_VEC2(long long, longlong, 16)

#undef GM_EMU_VEC2
#undef GM_EMU_VEC4
