// Runs a launch plan through the CUDA driver API. libcuda.so.1 is opened with dlopen on first use,
// so the library links and loads on machines without a driver (build machines, CI) and says what is
// missing when kernels are loaded there.
//
// Kernel modules belong to a CUDA context, not to a plugin instance: every layer and every clone
// that runs in one context shares one set (ContextKernels), loaded when the first of them attaches
// (TensorRT's configurePlugin / attachToContext, never inside enqueue, where a CUDA graph may be
// capturing) and unloaded when the last of them goes away.
#pragma once

#include <cuda.h>

#include <map>
#include <memory>
#include <string>

#include "moe_plan.h"

namespace mixexport {
namespace moe {

// The driver entry points the launcher uses, resolved from libcuda.so.1.
struct DriverApi {
    CUresult (*cuGetErrorString)(CUresult, const char**) = nullptr;
    CUresult (*cuDriverGetVersion)(int*) = nullptr;
    CUresult (*cuCtxGetCurrent)(CUcontext*) = nullptr;
    CUresult (*cuCtxGetDevice)(CUdevice*) = nullptr;
    CUresult (*cuDeviceGetAttribute)(int*, CUdevice_attribute, CUdevice) = nullptr;
    CUresult (*cuModuleLoadData)(CUmodule*, const void*) = nullptr;
    CUresult (*cuModuleUnload)(CUmodule) = nullptr;
    CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
    CUresult (*cuFuncSetAttribute)(CUfunction, CUfunction_attribute, int) = nullptr;
    CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                               CUstream, void**, void**) = nullptr;

    // The process-wide driver table; nullptr with `error` set when libcuda.so.1 or a symbol is missing.
    // `library` overrides the file name (tests).
    static const DriverApi* load(std::string* error, const char* library = "libcuda.so.1");
    std::string describe(CUresult result) const;
};

// Every variant of the build that runs on one context's device, loaded as modules of that context.
class ContextKernels {
public:
    ContextKernels(const DriverApi* api, CUcontext context) : api_(api), context_(context) {}
    ~ContextKernels();  // unloads every module it loaded
    ContextKernels(const ContextKernels&) = delete;
    ContextKernels& operator=(const ContextKernels&) = delete;

    // Queries the device, checks the driver version, loads the modules. On failure the modules
    // loaded so far stay owned by this object and are unloaded with it.
    std::string load();
    const DriverApi* api() const { return api_; }
    CUcontext context() const { return context_; }
    const Device& device() const { return device_; }
    // nullptr when `variant` is not part of the loaded build.
    CUfunction function(const VariantSpec* variant) const;

private:
    const DriverApi* api_;
    CUcontext context_;
    Device device_;
    std::map<const VariantSpec*, CUmodule> modules_;
    std::map<const VariantSpec*, CUfunction> functions_;
};

// The kernels of the calling thread's current CUDA context: shared with every other holder in this
// context, loaded here when there is none. Thread-safe. `no_context` (optional) is set when the
// failure is only that the thread has no current context. `library` overrides the driver's file name.
std::string acquireKernels(std::shared_ptr<const ContextKernels>* kernels, bool* no_context = nullptr,
                           const char* library = "libcuda.so.1");

// One plugin instance's view of the kernels: attach once (outside any stream capture), then launch
// plans on streams of the same context without loading anything or synchronizing the host.
class KernelLauncher {
public:
    // Acquires the current context's kernels. With `later_without_context`, a thread without a
    // current CUDA context is not an error: nothing is loaded and deferred() says so.
    std::string attach(bool later_without_context = false);
    bool attached() const { return kernels_ != nullptr; }
    bool deferred() const { return deferred_; }
    // Plans `problem` for the attached device and enqueues every launch on `stream`.
    std::string launch(const Problem& problem, const Tensors& tensors, CUstream stream) const;

private:
    std::shared_ptr<const ContextKernels> kernels_;
    bool deferred_ = false;
};

}  // namespace moe
}  // namespace mixexport
