#include "moe_launcher.h"

#include <dlfcn.h>

#include <mutex>

#include "moe_kernels_generated.h"

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
    resolve(handle, "cuDriverGetVersion", &api.cuDriverGetVersion, &missing);
    resolve(handle, "cuCtxGetCurrent", &api.cuCtxGetCurrent, &missing);
    resolve(handle, "cuCtxGetDevice", &api.cuCtxGetDevice, &missing);
    resolve(handle, "cuDeviceGetAttribute", &api.cuDeviceGetAttribute, &missing);
    resolve(handle, "cuModuleLoadData", &api.cuModuleLoadData, &missing);
    resolve(handle, "cuModuleUnload", &api.cuModuleUnload, &missing);
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

ContextKernels::~ContextKernels() {
    // The context may already be gone (its destruction unloads its modules); nothing to report then.
    for (auto& entry : modules_) api_->cuModuleUnload(entry.second);
}

std::string ContextKernels::load() {
    CUdevice dev = 0;
    int major = 0, minor = 0, shared = 0, driver = 0;
    CUresult r;
    if ((r = api_->cuCtxGetDevice(&dev)) != CUDA_SUCCESS ||
        (r = api_->cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)) != CUDA_SUCCESS ||
        (r = api_->cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)) != CUDA_SUCCESS ||
        (r = api_->cuDeviceGetAttribute(&shared, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev)) !=
            CUDA_SUCCESS ||
        (r = api_->cuDriverGetVersion(&driver)) != CUDA_SUCCESS)
        return "MixtralMoE: cannot query the current device: " + api_->describe(r);
    device_ = Device{major * 10 + minor, shared};
    int build_arch = 0;
    bool use_cubin = true;
    if (std::string error = chooseBuild(device_, &build_arch, &use_cubin); !error.empty()) return error;
    if (std::string error = checkDriver(driver, build_arch, use_cubin); !error.empty()) return error;
    for (const VariantSpec& v : kVariants) {
        if (v.arch != build_arch) continue;
        CUmodule module = nullptr;
        const void* image = use_cubin ? static_cast<const void*>(v.cubin) : static_cast<const void*>(v.ptx);
        if ((r = api_->cuModuleLoadData(&module, image)) != CUDA_SUCCESS)
            return std::string("MixtralMoE: loading the ") + (use_cubin ? "cubin" : "PTX") + " of " + v.name +
                   " failed: " + api_->describe(r);
        modules_.emplace(&v, module);
        CUfunction fn = nullptr;
        if ((r = api_->cuModuleGetFunction(&fn, module, v.entry)) != CUDA_SUCCESS)
            return std::string("MixtralMoE: ") + v.name + " has no function " + v.entry + ": " + api_->describe(r);
        // Above 48 KiB a block must opt in to its dynamic shared memory.
        if (v.shared_memory_bytes > 48 * 1024 &&
            (r = api_->cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                          v.shared_memory_bytes)) != CUDA_SUCCESS)
            return std::string("MixtralMoE: ") + v.name + " cannot get " + std::to_string(v.shared_memory_bytes) +
                   " bytes of shared memory: " + api_->describe(r);
        functions_.emplace(&v, fn);
    }
    return {};
}

CUfunction ContextKernels::function(const VariantSpec* variant) const {
    auto it = functions_.find(variant);
    return it == functions_.end() ? nullptr : it->second;
}

std::string acquireKernels(std::shared_ptr<const ContextKernels>* kernels, bool* no_context, const char* library) {
    // weak_ptr: the cache never keeps modules alive by itself; the last plugin holding them unloads them.
    static std::mutex mutex;
    static std::map<CUcontext, std::weak_ptr<const ContextKernels>> contexts;
    if (no_context) *no_context = false;
    std::string error;
    const DriverApi* api = DriverApi::load(&error, library);
    if (!api) return error;
    CUcontext ctx = nullptr;
    const CUresult r = api->cuCtxGetCurrent(&ctx);
    if (no_context) *no_context = r == CUDA_SUCCESS && !ctx;
    if (r != CUDA_SUCCESS || !ctx)
        return "MixtralMoE: no current CUDA context (" + (r == CUDA_SUCCESS ? std::string("none") : api->describe(r)) +
               ")";
    std::lock_guard<std::mutex> lock(mutex);
    if (auto shared = contexts[ctx].lock()) {
        *kernels = std::move(shared);
        return {};
    }
    auto fresh = std::make_shared<ContextKernels>(api, ctx);
    if (std::string failed = fresh->load(); !failed.empty()) {
        contexts.erase(ctx);
        return failed;  // `fresh` unloads what it loaded
    }
    contexts[ctx] = fresh;
    *kernels = std::move(fresh);
    return {};
}

std::string KernelLauncher::attach(bool later_without_context) {
    std::shared_ptr<const ContextKernels> kernels;
    bool no_context = false;
    if (std::string error = acquireKernels(&kernels, &no_context); !error.empty()) {
        if (!later_without_context) return error;  // a deferred copy stays deferred until it loads
        deferred_ = no_context;
        return deferred_ ? std::string() : error;
    }
    kernels_ = std::move(kernels);
    deferred_ = false;
    return {};
}

std::string KernelLauncher::launch(const Problem& problem, const Tensors& tensors, CUstream stream) const {
    if (problem.N == 0) return {};
    if (!kernels_) return "MixtralMoE: enqueue before the kernels were loaded (no configurePlugin/attachToContext)";
    const DriverApi* api = kernels_->api();
    CUcontext ctx = nullptr;
    if (api->cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || ctx != kernels_->context())
        return "MixtralMoE: enqueue in another CUDA context than the one the plugin was attached to";
    Plan plan;
    if (std::string failed = makePlan(problem, kernels_->device(), &plan); !failed.empty()) return failed;
    for (int i = 0; i < plan.num_launches; ++i) {
        const Launch& launch = plan.launches[i];
        CUfunction fn = kernels_->function(launch.variant);
        if (!fn) return std::string("MixtralMoE: ") + launch.variant->name + " is not loaded in this context";
        KernelArgs args;
        if (std::string failed = bindArgs(plan, i, tensors, &args); !failed.empty()) return failed;
        const CUresult r = api->cuLaunchKernel(fn, launch.grid[0], launch.grid[1], launch.grid[2], launch.block, 1, 1,
                                               launch.shared_bytes, stream, args.kernelParams(), nullptr);
        if (r != CUDA_SUCCESS)
            return std::string("MixtralMoE: launching ") + launch.variant->name + " failed: " + api->describe(r);
    }
    return {};
}

}  // namespace moe
}  // namespace mixexport
