// The MoE launcher behind a C ABI, for benchmarks/gpu_check.py: it runs the AOT-compiled kernels
// embedded in this build through the same plan and driver-API launcher as the TensorRT plugin, on
// device memory the caller (torch) allocated, on the caller's stream, with no TensorRT. Every
// function returns 0 on success, else writes a one-line message into `error`.
#include <cstdio>
#include <cstring>
#include <string>

#include "moe_kernels_generated.h"
#include "moe_launcher.h"
#include "moe_plan.h"

namespace {

using namespace mixexport::moe;

int fail(const std::string& message, char* error, size_t size) {
    if (error && size) std::snprintf(error, size, "%s", message.c_str());
    return 1;
}

bool parseDType(const char* name, DType* dtype) {
    if (std::strcmp(name, "fp16") == 0) *dtype = DType::kFP16;
    else if (std::strcmp(name, "bf16") == 0) *dtype = DType::kBF16;
    else return false;
    return true;
}

}  // namespace

extern "C" {

// Workspace bytes for N tokens (the bound over every built arch and tile, as the plugin reserves).
__attribute__((visibility("default"))) int mixexport_moe_workspace_bytes(int64_t n, int64_t h, int64_t i, int64_t e,
                                                                         int64_t k, const char* dtype, size_t* bytes,
                                                                         char* error, size_t size) {
    Problem p{n, h, i, e, k, true, DType::kFP16};
    if (!parseDType(dtype, &p.dtype)) return fail(std::string("unknown dtype ") + dtype, error, size);
    if (std::string message = workspaceBound(p, bytes); !message.empty()) return fail(message, error, size);
    return 0;
}

// Loads the kernels into the current CUDA context (call before any stream capture).
__attribute__((visibility("default"))) void* mixexport_moe_attach(char* error, size_t size) {
    auto* launcher = new KernelLauncher();
    if (std::string message = launcher->attach(); !message.empty()) {
        delete launcher;
        fail(message, error, size);
        return nullptr;
    }
    return launcher;
}

__attribute__((visibility("default"))) void mixexport_moe_detach(void* launcher) {
    delete static_cast<KernelLauncher*>(launcher);
}

// y = MoE(x, router_logits, w_gate_up, w_down) with normalize=1, enqueued on `stream`.
__attribute__((visibility("default"))) int mixexport_moe_launch(void* launcher, int64_t n, int64_t h, int64_t i,
                                                                int64_t e, int64_t k, const char* dtype, uint64_t x,
                                                                uint64_t router_logits, uint64_t w_gate_up,
                                                                uint64_t w_down, uint64_t y, uint64_t workspace,
                                                                void* stream, char* error, size_t size) {
    Problem p{n, h, i, e, k, true, DType::kFP16};
    if (!parseDType(dtype, &p.dtype)) return fail(std::string("unknown dtype ") + dtype, error, size);
    Tensors t;
    t.inputs[0] = x;
    t.inputs[1] = router_logits;
    t.inputs[2] = w_gate_up;
    t.inputs[3] = w_down;
    t.output = y;
    t.workspace = workspace;
    const std::string message =
        static_cast<KernelLauncher*>(launcher)->launch(p, t, static_cast<CUstream>(stream));
    return message.empty() ? 0 : fail(message, error, size);
}

}  // extern "C"
