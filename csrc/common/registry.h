// Each operation's binding file registers a function that adds its entry points to the module gm._C.
// bindings.cpp runs them all, so adding an op never edits a shared file.
#pragma once
#include <pybind11/pybind11.h>

#include <functional>
#include <vector>

namespace gm {

using Binder = std::function<void(pybind11::module_&)>;

inline std::vector<Binder>& binders() {
  static std::vector<Binder> all;  // function-local: safe against static-initialisation order
  return all;
}

struct RegisterBindings {
  explicit RegisterBindings(Binder b) { binders().push_back(std::move(b)); }
};

}  // namespace gm

#define GM_CONCAT_INNER(a, b) a##b
#define GM_CONCAT(a, b) GM_CONCAT_INNER(a, b)
// Usage at namespace scope in a .cpp: GM_REGISTER_BINDINGS(m) { m.def("name", &fn); }
#define GM_REGISTER_BINDINGS(module_var)                                                  \
  static void GM_CONCAT(gm_bind_, __LINE__)(pybind11::module_ & module_var);             \
  static ::gm::RegisterBindings GM_CONCAT(gm_registrar_, __LINE__)(GM_CONCAT(gm_bind_, __LINE__)); \
  static void GM_CONCAT(gm_bind_, __LINE__)(pybind11::module_ & module_var)
