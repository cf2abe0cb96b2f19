// The CUDA runtime functions of emu_cudart.h, over emu::rt().
#include "emu_cudart.h"

using emu::rt;

extern "C" {

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    default: return "another cudaError_t";
  }
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = rt().last_error;
  rt().last_error = cudaSuccess;
  return e;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = static_cast<int>(rt().devices.size());
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = rt().current;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= static_cast<int>(rt().devices.size())) return emu::fail(cudaErrorInvalidDevice);
  rt().current = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
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
  *attr = cudaFuncAttributes{};
  attr->sharedSizeBytes = emu::static_bytes_of(func);
  attr->maxDynamicSharedSizeBytes = static_cast<int>(emu::max_dynamic_of(func));
  attr->maxThreadsPerBlock = 1024;
  attr->binaryVersion = rt().devices.at(rt().current).image_arch;
  attr->ptxVersion = attr->binaryVersion;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return emu::fail(cudaErrorInvalidValue);
  const emu::DeviceModel& d = rt().devices.at(rt().current);
  const size_t st = emu::static_bytes_of(func);
  const size_t v = static_cast<size_t>(value);
  if (value < 0 || st + v > static_cast<size_t>(d.smem_optin)) return emu::fail(cudaErrorInvalidValue);
  if (d.refuse_opt_in && st + v > emu::kDefaultShared) return emu::fail(cudaErrorInvalidValue);
  rt().max_dynamic[{rt().current, func}] = v;
  return cudaSuccess;
}

}  // extern "C"
