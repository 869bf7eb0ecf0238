// How float32 operands reach the tensor cores (16-bit dtypes always use kNative). Host-safe: the binding files and
// Python (the precision argument) share these codes.
#pragma once

namespace gm {

enum class Precision : int { kNative = 0, kTf32 = 1, kTf32x3 = 2 };

}  // namespace gm
