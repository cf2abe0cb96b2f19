// The CUDA runtime functions of emu_cudart.h, over emu::rt().
#include "emu_cudart.h"

using emu::rt;

namespace {
std::unique_lock<std::mutex> locked() { return std::unique_lock<std::mutex>(rt().mutex); }
}  // namespace

extern "C" {

const char* cudaGetErrorName(cudaError_t e) {
  switch (static_cast<int>(e)) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case 1000: return "kErrorTooMuchSharedMemory (not a runtime code)";
    default: return "another cudaError_t";
  }
}

cudaError_t cudaGetLastError(void) {
  auto lock = locked();
  const cudaError_t e = rt().last_error;
  rt().last_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDeviceCount(int* count) {
  auto lock = locked();
  *count = static_cast<int>(rt().devices.size());
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  auto lock = locked();
  *device = rt().current;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  auto lock = locked();
  if (device < 0 || device >= static_cast<int>(rt().devices.size())) return emu::fail(cudaErrorInvalidDevice);
  rt().current = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  auto lock = locked();
  if (device < 0 || device >= static_cast<int>(rt().devices.size())) return emu::fail(cudaErrorInvalidDevice);
  const emu::DeviceModel& d = rt().devices[static_cast<size_t>(device)];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_optin; return cudaSuccess;
    default: return emu::fail(cudaErrorInvalidValue);
  }
}

cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* attr, const void* func) {
  auto lock = locked();
  *attr = cudaFuncAttributes{};
  attr->sharedSizeBytes = emu::static_bytes_of(func);
  attr->maxDynamicSharedSizeBytes = static_cast<int>(emu::max_dynamic_of(func));
  attr->maxThreadsPerBlock = 1024;
  attr->binaryVersion = rt().devices.at(rt().current).image_arch;
  attr->ptxVersion = attr->binaryVersion;
  ++rt().attribute_queries[{rt().current, func}];
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  auto lock = locked();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return emu::fail(cudaErrorInvalidValue);
  const emu::DeviceModel& d = rt().devices.at(rt().current);
  const size_t st = emu::static_bytes_of(func);
  const size_t v = static_cast<size_t>(value);
  if (value < 0 || st + v > static_cast<size_t>(d.smem_optin)) return emu::fail(cudaErrorInvalidValue);
  if (d.refuse_opt_in && st + v > emu::kDefaultShared) return emu::fail(cudaErrorInvalidValue);
  rt().max_dynamic[{rt().current, func}] = v;
  const std::function<void()> hook = rt().after_set_attribute;
  lock.unlock();
  if (hook) hook();
  return cudaSuccess;
}

}  // extern "C"
