// moe_plan_dump ARCH DTYPE N H I E K [QUANT_BITS GROUP_SIZE]: the plan as JSON (variants, grids, workspace, bound args), or
// {"error": ...}. Used by tests/plugins to compare the C++ plan with the Python formulas.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "moe_kernels_generated.h"
#include "moe_plan.h"

using namespace mixexport::moe;

int main(int argc, char** argv) {
    if (argc == 2 && std::strcmp(argv[1], "--contract") == 0) {
        std::printf("{\"name\": \"%s\", \"namespace\": \"%s\", \"version\": \"%s\", \"fields\": [", kPluginName,
                    kPluginNamespace, kPluginVersion);
        for (int i = 0; i < kNumFields; ++i) std::printf("%s\"%s\"", i ? ", " : "", kFieldNames[i]);
        std::printf("], \"inputs\": [");
        for (size_t i = 0; i < sizeof(kInputNames) / sizeof(kInputNames[0]); ++i)
            std::printf("%s\"%s\"", i ? ", " : "", kInputNames[i]);
        std::printf("]}\n");
        return 0;
    }
    if (argc != 8 && argc != 10) {
        std::fprintf(stderr, "usage: moe_plan_dump ARCH fp16|bf16|fp32 N H I E K [QUANT_BITS GROUP_SIZE] | --contract\n");
        return 2;
    }
    const std::string dtype = argv[2];
    Problem p{std::atoll(argv[3]), std::atoll(argv[4]), std::atoll(argv[5]), std::atoll(argv[6]), std::atoll(argv[7]),
              true, dtype == "bf16" ? DType::kBF16 : dtype == "fp32" ? DType::kFP32 : DType::kFP16,
              argc == 10 ? std::atoi(argv[8]) : 0, argc == 10 ? std::atoi(argv[9]) : 0};
    Plan plan;
    size_t bound = 0;
    std::string error = makePlan(p, Device{std::atoi(argv[1]), 0}, &plan);
    if (error.empty()) error = workspaceBound(p, &bound);
    if (!error.empty()) {
        std::printf("{\"error\": \"%s\"}\n", error.c_str());
        return 0;
    }
    std::printf("{\"build_arch\": %d, \"block_m\": %d, \"split_k\": %d, \"workspace_total\": %zu, \"workspace_bound\": %zu, "
                "\"workspace\": {", plan.build_arch, plan.block_m, plan.split_k, plan.workspace.total_bytes, bound);
    for (int b = 0; b < plan.workspace.num_buffers; ++b)
        std::printf("%s\"%s\": [%zu, %zu]", b ? ", " : "", plan.workspace.buffers[b].name,
                    plan.workspace.buffers[b].offset, plan.workspace.buffers[b].bytes);
    std::printf("}, \"launches\": [");
    // Fake, aligned addresses: inputs at 1..4 << 32, output 5 << 32, workspace 6 << 32, scales 7..8 << 32.
    Tensors t;
    for (int i = 0; i < 4; ++i) t.inputs[i] = static_cast<uint64_t>(i + 1) << 32;
    for (int i = 4; i < 6; ++i) t.inputs[i] = static_cast<uint64_t>(i + 3) << 32;
    t.output = 5ull << 32;
    t.workspace = 6ull << 32;
    for (int k = 0; k < plan.num_launches; ++k) {
        const Launch& l = plan.launches[k];
        KernelArgs args;
        error = bindArgs(plan, k, t, &args);
        std::printf("%s{\"variant\": \"%s\", \"cubin\": %s, \"grid\": [%u, %u, %u], \"block\": %u, \"shared\": %u, "
                    "\"args\": [", k ? ", " : "", l.variant->name, l.use_cubin ? "true" : "false", l.grid[0],
                    l.grid[1], l.grid[2], l.block, l.shared_bytes);
        for (int i = 0; i < args.count; ++i) {
            const ParamSpec& param = l.variant->params[i];
            if (param.is_pointer)
                std::printf("%s[\"%s\", %llu]", i ? ", " : "", param.name,
                            static_cast<unsigned long long>(args.values[i].ptr));
            else
                std::printf("%s[\"%s\", %d]", i ? ", " : "", param.name, args.values[i].i32);
        }
        std::printf("], \"error\": \"%s\"}", error.c_str());
    }
    std::printf("]}\n");
    return 0;
}
