// Extra entry points of the emulated gm._C module (tools/cuda_emu): counters and the barrier release order.
#include <pybind11/pybind11.h>

#include "common/registry.h"
#include "gm_emu/stats.h"

GM_REGISTER_BINDINGS(m) {
  m.attr("emulated") = true;
  m.def("emu_stats", [] {
    const gm_emu::Stats& s = gm_emu::stats();
    pybind11::dict d;
    d["launches"] = s.launches;
    d["blocks"] = s.blocks;
    d["barriers"] = s.barriers;
    d["warp_collectives"] = s.warp_collectives;
    d["switches"] = s.switches;
    d["async_copies"] = s.async_copies;
    d["unchecked_launches"] = s.unchecked_launches;
    return d;
  }, "Emulator counters since the module was loaded");
  m.def("emu_set_order", &gm_emu::set_order, pybind11::arg("order"), pybind11::arg("seed") = 0,
        "Order of the threads a barrier releases: random (seeded), forward or reverse");
  m.def("emu_order", &gm_emu::order);
}
