// The gvsl_fast op library. Each op's schema is defined beside its CPU kernel in
// csrc/cpu/<op>.cpp (TORCH_LIBRARY_FRAGMENT); CUDA kernels register in csrc/cuda/<op>.cu.
// This file makes `gvsl_fast._C` importable and reports how it was built.
#include <Python.h>
#include <torch/library.h>

namespace {
bool cuda_built() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

extern "C" {
// Importing gvsl_fast._C runs the static TORCH_LIBRARY registrations below and in each op file.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(gvsl_fast, m) {
  m.def("cuda_built() -> bool", &cuda_built);
}
