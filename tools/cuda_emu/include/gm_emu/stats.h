// Counters and settings of the gm CUDA emulator, for its Python binding (src/emu_bind.cpp) and tests.
#pragma once
#include <cstdint>
#include <string>

namespace gm_emu {

struct Stats {
  std::uint64_t launches = 0, blocks = 0, barriers = 0, warp_collectives = 0, switches = 0, async_copies = 0;
  std::uint64_t unchecked_launches = 0;  // launches not followed by cudaGetLastError before the next one
};

Stats& stats();
// Order in which the threads released by a barrier run: "random" (seeded shuffle, the default), "forward" or
// "reverse". The environment variables GM_EMU_ORDER and GM_EMU_SEED set the initial values.
void set_order(const std::string& order, std::uint64_t seed);
std::string order();

}  // namespace gm_emu
