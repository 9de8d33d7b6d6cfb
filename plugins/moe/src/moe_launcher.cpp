#include "moe_launcher.h"

#include <dlfcn.h>

namespace mixexport {
namespace moe {
namespace {

template <typename Fn>
bool resolve(void* handle, const char* name, Fn* fn, std::string* missing) {
    *fn = reinterpret_cast<Fn>(dlsym(handle, name));
    if (!*fn) *missing += std::string(missing->empty() ? "" : ", ") + name;
    return *fn != nullptr;
}

}  // namespace

const DriverApi* DriverApi::load(std::string* error, const char* library) {
    static std::mutex mutex;
    static std::map<std::string, DriverApi> loaded;
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = loaded.find(library); it != loaded.end()) return &it->second;
    // Never dlclose'd: function pointers and loaded modules outlive any one plugin.
    void* handle = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        const char* why = dlerror();
        *error = std::string("MixtralMoE: cannot load the CUDA driver library ") + library + " (" +
                 (why ? why : "unknown error") + "); the plugin needs an NVIDIA driver and GPU at run time";
        return nullptr;
    }
    DriverApi api;
    std::string missing;
    resolve(handle, "cuGetErrorString", &api.cuGetErrorString, &missing);
    resolve(handle, "cuCtxGetCurrent", &api.cuCtxGetCurrent, &missing);
    resolve(handle, "cuCtxGetDevice", &api.cuCtxGetDevice, &missing);
    resolve(handle, "cuDeviceGetAttribute", &api.cuDeviceGetAttribute, &missing);
    resolve(handle, "cuModuleLoadData", &api.cuModuleLoadData, &missing);
    resolve(handle, "cuModuleGetFunction", &api.cuModuleGetFunction, &missing);
    resolve(handle, "cuFuncSetAttribute", &api.cuFuncSetAttribute, &missing);
    resolve(handle, "cuLaunchKernel", &api.cuLaunchKernel, &missing);
    if (!missing.empty()) {
        *error = std::string("MixtralMoE: ") + library + " lacks " + missing + "; update the NVIDIA driver";
        return nullptr;
    }
    return &loaded.emplace(library, api).first->second;
}

std::string DriverApi::describe(CUresult result) const {
    const char* text = nullptr;
    if (cuGetErrorString && cuGetErrorString(result, &text) == CUDA_SUCCESS && text) return text;
    return "CUresult " + std::to_string(static_cast<int>(result));
}

std::string KernelLauncher::contextState(ContextState** state) {
    std::string error;
    if (!api_ && !(api_ = DriverApi::load(&error))) return error;
    CUcontext ctx = nullptr;
    CUresult r = api_->cuCtxGetCurrent(&ctx);
    if (r != CUDA_SUCCESS || !ctx)
        return "MixtralMoE: no current CUDA context (" + (r == CUDA_SUCCESS ? "none" : api_->describe(r)) + ")";
    auto it = contexts_.find(ctx);
    if (it == contexts_.end()) {
        ContextState fresh;
        CUdevice dev = 0;
        int major = 0, minor = 0, shared = 0;
        if ((r = api_->cuCtxGetDevice(&dev)) != CUDA_SUCCESS ||
            (r = api_->cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)) != CUDA_SUCCESS ||
            (r = api_->cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)) != CUDA_SUCCESS ||
            (r = api_->cuDeviceGetAttribute(&shared, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev)) !=
                CUDA_SUCCESS)
            return "MixtralMoE: cannot query the current device: " + api_->describe(r);
        fresh.device = Device{major * 10 + minor, shared};
        it = contexts_.emplace(ctx, std::move(fresh)).first;
    }
    *state = &it->second;
    return {};
}

std::string KernelLauncher::currentDevice(Device* device) {
    std::lock_guard<std::mutex> lock(mutex_);
    ContextState* state = nullptr;
    if (std::string error = contextState(&state); !error.empty()) return error;
    *device = state->device;
    return {};
}

std::string KernelLauncher::function(ContextState& state, const Launch& launch, CUfunction* fn) {
    const VariantSpec* v = launch.variant;
    if (auto it = state.functions.find(v); it != state.functions.end()) {
        *fn = it->second;
        return {};
    }
    CUmodule module = nullptr;
    const void* image = launch.use_cubin ? static_cast<const void*>(v->cubin) : static_cast<const void*>(v->ptx);
    CUresult r = api_->cuModuleLoadData(&module, image);
    if (r != CUDA_SUCCESS)
        return std::string("MixtralMoE: loading the ") + (launch.use_cubin ? "cubin" : "PTX") + " of " + v->name +
               " failed: " + api_->describe(r);
    state.modules.push_back(module);
    if ((r = api_->cuModuleGetFunction(fn, module, v->entry)) != CUDA_SUCCESS)
        return std::string("MixtralMoE: ") + v->name + " has no function " + v->entry + ": " + api_->describe(r);
    // Above 48 KiB a block must opt in to its dynamic shared memory.
    if (v->shared_memory_bytes > 48 * 1024 &&
        (r = api_->cuFuncSetAttribute(*fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, v->shared_memory_bytes)) !=
            CUDA_SUCCESS)
        return std::string("MixtralMoE: ") + v->name + " cannot get " + std::to_string(v->shared_memory_bytes) +
               " bytes of shared memory: " + api_->describe(r);
    state.functions.emplace(v, *fn);
    return {};
}

std::string KernelLauncher::launch(const Plan& plan, const Tensors& tensors, CUstream stream) {
    if (plan.num_launches == 0) return {};
    std::lock_guard<std::mutex> lock(mutex_);
    ContextState* state = nullptr;
    if (std::string error = contextState(&state); !error.empty()) return error;
    for (int i = 0; i < plan.num_launches; ++i) {
        const Launch& launch = plan.launches[i];
        CUfunction fn = nullptr;
        if (std::string error = function(*state, launch, &fn); !error.empty()) return error;
        KernelArgs args;
        if (std::string error = bindArgs(plan, i, tensors, &args); !error.empty()) return error;
        const CUresult r = api_->cuLaunchKernel(fn, launch.grid[0], launch.grid[1], launch.grid[2], launch.block, 1, 1,
                                                launch.shared_bytes, stream, args.kernelParams(), nullptr);
        if (r != CUDA_SUCCESS)
            return std::string("MixtralMoE: launching ") + launch.variant->name + " failed: " + api_->describe(r);
    }
    return {};
}

}  // namespace moe
}  // namespace mixexport
