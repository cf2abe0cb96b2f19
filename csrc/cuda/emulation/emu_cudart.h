// A host emulation of the few CUDA runtime calls the library's launchers make
// (csrc/include/jdlora/cuda/launch.h), over a table of emulated devices, so
// that the real launch logic runs without a GPU: device limits, each
// kernel's static shared memory and image architecture, the opt-in above
// 48 KiB, clusters, and the launch itself (emu_launch.h runs the grid on the
// fibers of emu_runtime.h). The C functions are defined in emu_cudart.cpp.
//
// Rules enforced at launch, as the CUDA runtime does:
//   * dynamic shared memory above the kernel's current limit (48 KiB minus
//     its static bytes, or what cudaFuncSetAttribute raised it to) is
//     refused with cudaErrorInvalidValue; raising it above the device's
//     opt-in limit minus the static bytes is refused the same way;
//   * clusters need an sm_90 device, at most 8 blocks, and a grid whose x
//     size they divide (cudaErrorInvalidConfiguration here; the real runtime
//     reports some of these with other codes);
//   * an image compiled below sm_90 traps on cl > 1 (tc_hw_emu.h).
// The runtime is thread-safe as the real one is (one lock around every call
// and every launch; launches run one after another), so that host threads
// can race on the library's launch path. A test can run code right after an
// opt-in has been set (after_set_attribute, called without the lock held) to
// place another thread's call between a launcher's opt-in and its launch.
// The current device and the last error are per process here, not per host
// thread: the multi-threaded checks use one device.
// A kernel's static bytes are not known to the host compiler: the driver
// registers them (register_kernel), mirroring the kernels' __shared__
// declarations; launching an unregistered kernel aborts.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "emu_runtime.h"

namespace emu {

struct DeviceModel {
  const char* name;
  int major;
  int sms;
  int smem_optin;       // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int image_arch;       // architecture of the loaded image (clusters from 90)
  bool refuse_opt_in;   // cudaFuncSetAttribute fails above the default (a driver that refuses)
};

struct LaunchRecord {
  const void* kernel;
  dim3 grid, block;
  size_t smem;
  int cluster;
};

struct Runtime {
  std::vector<DeviceModel> devices;
  int current = 0;
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, size_t> static_bytes;
  std::map<std::pair<int, const void*>, size_t> max_dynamic;  // raised limits, per device
  std::vector<LaunchRecord> launches;
  std::map<std::pair<int, const void*>, int> attribute_queries;  // cudaFuncGetAttributes calls, per device
  std::function<void()> after_set_attribute;
  std::mutex mutex;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline constexpr size_t kDefaultShared = 48 * 1024;

template <typename... P>
void register_kernel(void (*kernel)(P...), size_t static_bytes) {
  rt().static_bytes[reinterpret_cast<const void*>(kernel)] = static_bytes;
}

inline size_t static_bytes_of(const void* kernel) {
  auto it = rt().static_bytes.find(kernel);
  if (it == rt().static_bytes.end()) {
    std::fprintf(stderr, "emulation: kernel %p has no registered static shared memory\n", kernel);
    std::abort();
  }
  return it->second;
}

inline size_t max_dynamic_of(const void* kernel) {
  auto it = rt().max_dynamic.find({rt().current, kernel});
  if (it != rt().max_dynamic.end()) return it->second;
  const size_t st = static_bytes_of(kernel);
  return st < kDefaultShared ? kDefaultShared - st : 0;
}

inline cudaError_t fail(cudaError_t e) {
  rt().last_error = e;
  return e;
}

// Validates a launch like the runtime, then runs every block (every cluster
// of cl blocks) of the grid, one after the other.
inline cudaError_t launch_grid(const cudaLaunchConfig_t& cfg, const void* kernel, const std::function<void()>& body) {
  const std::lock_guard<std::mutex> lock(rt().mutex);
  const DeviceModel& d = rt().devices.at(rt().current);
  int cl = 1;
  for (unsigned i = 0; i < cfg.numAttrs; ++i)
    if (cfg.attrs[i].id == cudaLaunchAttributeClusterDimension) cl = static_cast<int>(cfg.attrs[i].val.clusterDim.x);
  const unsigned threads = cfg.blockDim.x * cfg.blockDim.y * cfg.blockDim.z;
  if (threads == 0 || threads > 1024 || cfg.blockDim.y != 1 || cfg.blockDim.z != 1 || cfg.gridDim.z != 1)
    return fail(cudaErrorInvalidConfiguration);
  if (cfg.dynamicSmemBytes > max_dynamic_of(kernel)) return fail(cudaErrorInvalidValue);
  if (cl > 1 && (d.major < 9 || cl > 8 || cfg.gridDim.x % cl != 0)) return fail(cudaErrorInvalidConfiguration);
  rt().launches.push_back({kernel, cfg.gridDim, cfg.blockDim, cfg.dynamicSmemBytes, cl});
  m().image_arch = d.image_arch;
  for (unsigned by = 0; by < cfg.gridDim.y; ++by)
    for (unsigned bx = 0; bx < cfg.gridDim.x; bx += static_cast<unsigned>(cl))
      run_cluster(body, cfg.gridDim, bx, by, cl, static_cast<int>(threads), cfg.dynamicSmemBytes);
  return cudaSuccess;
}

}  // namespace emu
