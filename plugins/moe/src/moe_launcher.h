// Runs a launch plan through the CUDA driver API. libcuda.so.1 is opened with dlopen on first use,
// so the library links and loads on machines without a driver (build machines, CI) and says what is
// missing when a launch is attempted there.
#pragma once

#include <cuda.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "moe_plan.h"

namespace mixexport {
namespace moe {

// The driver entry points the launcher uses, resolved from libcuda.so.1.
struct DriverApi {
    CUresult (*cuGetErrorString)(CUresult, const char**) = nullptr;
    CUresult (*cuCtxGetCurrent)(CUcontext*) = nullptr;
    CUresult (*cuCtxGetDevice)(CUdevice*) = nullptr;
    CUresult (*cuDeviceGetAttribute)(int*, CUdevice_attribute, CUdevice) = nullptr;
    CUresult (*cuModuleLoadData)(CUmodule*, const void*) = nullptr;
    CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
    CUresult (*cuFuncSetAttribute)(CUfunction, CUfunction_attribute, int) = nullptr;
    CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                               CUstream, void**, void**) = nullptr;

    // The process-wide driver table; nullptr with `error` set when libcuda.so.1 or a symbol is missing.
    // `library` overrides the file name (tests).
    static const DriverApi* load(std::string* error, const char* library = "libcuda.so.1");
    std::string describe(CUresult result) const;
};

// Loads the kernels once per CUDA context and launches a plan on a stream. Thread-safe; launches
// never synchronize the host.
class KernelLauncher {
public:
    // The current context's device (arch, shared memory limit); empty string on success.
    std::string currentDevice(Device* device);
    // Enqueue every launch of `plan` on `stream`. Empty string on success.
    std::string launch(const Plan& plan, const Tensors& tensors, CUstream stream);

private:
    struct ContextState {
        Device device;
        std::vector<CUmodule> modules;                       // kept loaded for the context's lifetime
        std::map<const VariantSpec*, CUfunction> functions;  // by variant (cubin or PTX, as first asked)
    };
    std::string contextState(ContextState** state);
    std::string function(ContextState& state, const Launch& launch, CUfunction* fn);

    const DriverApi* api_ = nullptr;
    std::mutex mutex_;
    std::map<CUcontext, ContextState> contexts_;
};

}  // namespace moe
}  // namespace mixexport
