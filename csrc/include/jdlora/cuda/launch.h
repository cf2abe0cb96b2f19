// Host side of every kernel launch of this library: the current device's
// limits, the kernel's own static shared memory and image architecture, the
// shared-memory opt-in and the launch (optionally as thread-block clusters).
//
// One place, because the rules are easy to get subtly wrong in each launcher:
//   * a block gets 48 KiB of shared memory without opting in, and that budget
//     covers the kernel's static __shared__ arrays *and* the dynamic bytes;
//     above it cudaFuncAttributeMaxDynamicSharedMemorySize must be raised to
//     the dynamic bytes, and static + dynamic must stay within the device's
//     opt-in limit (163 KiB on sm_80, 227 KiB on sm_90);
//   * whether clusters exist is a property of the *loaded image* (its
//     __CUDA_ARCH__ decides what cluster_barrier compiles to), not of the
//     device alone: an sm_80 image runs on an sm_90 device without them.
//   * the opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize) is one value
//     per kernel and device shared by every host thread: it is only ever
//     raised, so that a thread launching with fewer bytes cannot take it from
//     under another thread between that thread's opt-in and its launch.
// Kernel attributes and the raised limit are cached per (device, kernel):
// one cudaFuncGetAttributes per kernel and device per process, not per op.
// Failures are returned, never left behind in cudaGetLastError, so that a
// fast path that cannot launch can fall back to the simple kernels; an error
// some earlier, unrelated work left pending is left pending.
//
// JDLORA_LAUNCH_ENQUEUE_HEADER, when defined, names a replacement of
// enqueue() (the host emulation in csrc/cuda/emulation runs the grid there).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "jdlora/cuda/launchers.h"  // kErrorTooMuchSharedMemory

namespace jdlora::cuda {

// Shared memory every block may use without opting in.
inline constexpr size_t kDefaultSharedBytes = 48 * 1024;

struct DeviceInfo {
  int sms = 0;
  int major = 0;
  int smem_optin = 0;  // most shared memory (static + dynamic) one block may opt in to
};

// Read once per process for every device (function-local static: thread-safe).
inline const DeviceInfo& device_info() {
  static const std::vector<DeviceInfo> infos = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    std::vector<DeviceInfo> v(static_cast<size_t>(n));
    bool failed = false;
    for (int d = 0; d < n; ++d) {
      failed |= cudaDeviceGetAttribute(&v[d].sms, cudaDevAttrMultiProcessorCount, d) != cudaSuccess;
      failed |= cudaDeviceGetAttribute(&v[d].major, cudaDevAttrComputeCapabilityMajor, d) != cudaSuccess;
      failed |= cudaDeviceGetAttribute(&v[d].smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, d) != cudaSuccess;
    }
    // A failed query must not leave its error for the next launch check; an
    // error that was pending before belongs to someone else and stays.
    if (failed) cudaGetLastError();
    return v;
  }();
  static const DeviceInfo none{};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= static_cast<int>(infos.size())) return none;
  return infos[static_cast<size_t>(dev)];
}

// What the image of `kernel` loaded for the current device provides.
struct KernelInfo {
  bool ok = false;
  size_t static_bytes = 0;  // its static __shared__ arrays
  int arch = 0;             // the architecture its device code was compiled for, e.g. 80 or 90
};

namespace detail {

// What this process knows of one kernel on one device: its image's
// attributes, and the dynamic shared memory its limit was raised to.
struct KernelState {
  KernelInfo info;
  size_t raised = 0;
};

struct KernelStates {
  std::mutex mutex;
  std::map<std::pair<int, const void*>, KernelState> by_device_kernel;
};

inline KernelStates& kernel_states() {
  static KernelStates s;
  return s;
}

inline int current_device() {
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return dev;
}

inline KernelInfo query_kernel_info(const void* kernel) {
  cudaFuncAttributes attr{};
  KernelInfo k;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return k;
  }
  k.ok = true;
  k.static_bytes = attr.sharedSizeBytes;
  // __CUDA_ARCH__ of the code that runs is the PTX target it was compiled
  // from (ptxVersion), which a JIT-compiled image can have below its SASS
  // target (binaryVersion): the lower of the two is what the code was built for.
  k.arch = attr.ptxVersion > 0 && attr.ptxVersion < attr.binaryVersion ? attr.ptxVersion : attr.binaryVersion;
  return k;
}

}  // namespace detail

// kernel's attributes on the current device, queried once per process. A
// failed query is not kept: the next call asks again.
inline KernelInfo kernel_info(const void* kernel) {
  const int dev = detail::current_device();
  auto& states = detail::kernel_states();
  const std::lock_guard<std::mutex> lock(states.mutex);
  auto [it, fresh] = states.by_device_kernel.try_emplace({dev, kernel});
  if (fresh || !it->second.info.ok) it->second.info = detail::query_kernel_info(kernel);
  return it->second.info;
}

// Thread-block clusters need both an sm_90 device and an image compiled for
// it (the device code tests __CUDA_ARCH__); deciding from the device alone
// would launch clusters whose barriers are plain __syncthreads.
inline bool clusters_available(const DeviceInfo& dev, const KernelInfo& k) {
  return dev.major >= 9 && k.arch >= 90;
}

enum class SharedFit { kDefault, kOptIn, kTooLarge };

// Whether `dynamic` bytes on top of a kernel's `static_bytes` launch as is,
// need the opt-in, or cannot launch on a device whose opt-in limit is `optin`.
constexpr SharedFit shared_fit(size_t static_bytes, size_t dynamic, size_t optin) {
  if (static_bytes + dynamic <= kDefaultSharedBytes) return SharedFit::kDefault;
  if (static_bytes + dynamic <= optin) return SharedFit::kOptIn;
  return SharedFit::kTooLarge;
}

// Most dynamic shared memory `k` can get on `dev` (for error messages and
// for launchers that size tiles to fit).
inline size_t max_dynamic_shared(const DeviceInfo& dev, const KernelInfo& k) {
  const size_t limit = dev.smem_optin > 0 ? static_cast<size_t>(dev.smem_optin) : kDefaultSharedBytes;
  return limit > k.static_bytes ? limit - k.static_bytes : 0;
}

}  // namespace jdlora::cuda

#ifdef JDLORA_LAUNCH_ENQUEUE_HEADER
#include JDLORA_LAUNCH_ENQUEUE_HEADER
#else
namespace jdlora::cuda {
template <typename... P, typename... A>
cudaError_t enqueue(const cudaLaunchConfig_t& cfg, void (*kernel)(P...), A&&... args) {
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
}
}  // namespace jdlora::cuda
#endif

namespace jdlora::cuda {

struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t dynamic_smem = 0;
  int cluster = 1;  // blocks per cluster along x; > 1 only where clusters_available()
};

// Raises kernel's dynamic shared memory limit on the current device to at
// least `bytes`, never lowering it. The lock makes check-and-raise one step
// for the threads of this process; since no thread lowers it, a limit seen
// raised stays raised until the launch that relied on it.
inline cudaError_t raise_dynamic_shared(const void* kernel, size_t bytes) {
  const int dev = detail::current_device();
  auto& states = detail::kernel_states();
  const std::lock_guard<std::mutex> lock(states.mutex);
  detail::KernelState& st = states.by_device_kernel[{dev, kernel}];
  if (st.raised >= bytes) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e != cudaSuccess) {
    cudaGetLastError();
    // The runtime's way of saying the bytes exceed the device's limit (or a
    // driver refusing the opt-in altogether).
    return e == cudaErrorInvalidValue ? kErrorTooMuchSharedMemory : e;
  }
  st.raised = bytes;
  return cudaSuccess;
}

// Opts in to the shared memory the launch needs and enqueues it. Returns
// kErrorTooMuchSharedMemory, launching nothing, when static + dynamic shared
// memory exceeds what the device (or its driver) allows, and
// cudaErrorInvalidConfiguration for a cluster the image or the device cannot
// run; other errors are those of the runtime. No error of this launch is
// left pending for cudaGetLastError either way.
// `k` is kernel_info(kernel), for callers that needed it to size the launch.
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), const KernelInfo& k, const LaunchShape& s, cudaStream_t stream,
                          A&&... args) {
  if (s.grid.x == 0 || s.grid.y == 0 || s.grid.z == 0) return cudaSuccess;
  const DeviceInfo& dev = device_info();
  if (!k.ok) return cudaErrorInvalidDeviceFunction;
  if (s.cluster > 1 && (!clusters_available(dev, k) || s.grid.x % s.cluster != 0))
    return cudaErrorInvalidConfiguration;
  switch (shared_fit(k.static_bytes, s.dynamic_smem, static_cast<size_t>(dev.smem_optin))) {
    case SharedFit::kTooLarge:
      return kErrorTooMuchSharedMemory;
    case SharedFit::kOptIn: {
      const cudaError_t e = raise_dynamic_shared(reinterpret_cast<const void*>(kernel), s.dynamic_smem);
      if (e != cudaSuccess) return e;
      break;
    }
    case SharedFit::kDefault:
      break;
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = s.grid;
  cfg.blockDim = s.block;
  cfg.dynamicSmemBytes = s.dynamic_smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  if (s.cluster > 1) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(s.cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  const cudaError_t e = enqueue(cfg, kernel, std::forward<A>(args)...);
  if (e != cudaSuccess) cudaGetLastError();
  return e;
}

template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kernel)(P...), const LaunchShape& s, cudaStream_t stream, A&&... args) {
  return launch_kernel(kernel, kernel_info(reinterpret_cast<const void*>(kernel)), s, stream,
                       std::forward<A>(args)...);
}

}  // namespace jdlora::cuda
