// Large CPU outputs and scatter buffers. A fresh buffer of more than glibc's mmap threshold
// (32 MiB at most) is new memory each time: one page fault per 4 KiB page on its first write,
// which cost as much as the lncc kernel that fills its coefficient maps. Asking for transparent huge pages makes that
// one fault per 2 MiB where the system allows them (THP "madvise" or "always"); elsewhere the
// hint does nothing.
#pragma once
#include <ATen/ATen.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <cstdint>

namespace gvsl {

// The accumulation dtype of buffers for inputs like t (gvsl::acc_t): double for double inputs,
// float for the rest.
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Hints huge pages for the 2 MiB-aligned interior of a fresh (not yet written) CPU tensor.
inline at::Tensor huge_pages(at::Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (lo + kHuge - 1) & ~(kHuge - 1), last = (lo + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return t;
}

// A zero-filled tensor with t's sizes and strides in `dtype` (a scatter's accumulation buffer),
// its pages hinted huge before the fill touches them.
inline at::Tensor huge_zeros_like(const at::Tensor& t, at::ScalarType dtype) {
  return huge_pages(at::empty_like(t, t.options().dtype(dtype))).zero_();
}

}  // namespace gvsl
