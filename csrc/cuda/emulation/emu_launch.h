// Replacement of enqueue() in jdlora/cuda/launch.h (through
// JDLORA_LAUNCH_ENQUEUE_HEADER): the launch runs on the host emulation.
#pragma once

#include <tuple>
#include <type_traits>

#include "emu_cudart.h"

namespace jdlora::cuda {

template <typename... P, typename... A>
cudaError_t enqueue(const cudaLaunchConfig_t& cfg, void (*kernel)(P...), A&&... args) {
  // Kernel arguments are copied at launch, as on the device.
  std::tuple<std::decay_t<A>...> copy(std::forward<A>(args)...);
  return emu::launch_grid(cfg, reinterpret_cast<const void*>(kernel), [&] { std::apply(kernel, copy); });
}

}  // namespace jdlora::cuda
