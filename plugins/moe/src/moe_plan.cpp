#include "moe_plan.h"

#include <algorithm>
#include <limits>

#include "moe_kernels_generated.h"

namespace mixexport {
namespace moe {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

size_t alignUp(size_t value) { return (value + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment; }

Dims dimsOf(const Problem& p, int64_t block_m, int64_t split_k) {
    return Dims{p.N, p.H, p.I, p.E, p.K, p.normalize ? 1 : 0, block_m, dtypeBytes(p.dtype), split_k};
}

bool dtypeBuilt(DType dtype) {
    return std::find(std::begin(kBuiltDTypes), std::end(kBuiltDTypes), dtype) != std::end(kBuiltDTypes);
}

bool archBuilt(int arch) {
    return std::find(std::begin(kBuiltArchs), std::end(kBuiltArchs), arch) != std::end(kBuiltArchs);
}

std::string builtArchList() {
    std::string out;
    for (int arch : kBuiltArchs) out += (out.empty() ? "sm_" : ", sm_") + std::to_string(arch);
    return out;
}

const TileSpec* findTile(int arch, Tile tile) {
    for (const TileSpec& t : kTiles)
        if (t.arch == arch && t.tile == tile) return &t;
    return nullptr;
}

const VariantSpec* findVariant(Kernel kernel, int arch, const Problem& p, Tile tile) {
    const bool gemm = kernel == Kernel::kGateUp || kernel == Kernel::kDown;
    for (const VariantSpec& v : kVariants) {
        if (v.kernel != kernel || v.arch != arch) continue;
        if (v.dtype != DType::kAny && v.dtype != p.dtype) continue;
        if (gemm && (v.tile != tile || v.quant_bits != p.quant_bits || v.group_size != p.group_size)) continue;
        return &v;
    }
    return nullptr;
}

std::string quantName(int bits, int group_size) {
    if (bits == 0) return "16-bit";
    return "int" + std::to_string(bits) + (group_size ? "-g" + std::to_string(group_size) : "");
}

// Whether any GEMM variant reads weights of this scheme (the AOT build's --quant list).
bool quantBuilt(int bits, int group_size) {
    for (const VariantSpec& v : kVariants)
        if ((v.kernel == Kernel::kGateUp || v.kernel == Kernel::kDown) && v.quant_bits == bits &&
            v.group_size == group_size)
            return true;
    return false;
}

}  // namespace

void** KernelArgs::kernelParams() {
    for (int i = 0; i < count; ++i) pointers_[i] = &values[i];
    return pointers_.data();
}

int64_t dtypeBytes(DType dtype) {
    switch (dtype) {
        case DType::kFP16: return 2;
        case DType::kBF16: return 2;
        case DType::kFP32: return 4;
        default: return 0;
    }
}

const char* dtypeName(DType dtype) {
    switch (dtype) {
        case DType::kFP16: return "fp16";
        case DType::kBF16: return "bf16";
        case DType::kFP32: return "fp32";
        default: return "any";
    }
}

const char* kernelName(Kernel kernel) {
    static const char* names[] = {"routing", "align_count", "align_scatter", "gate_up", "down", "topk_reduce"};
    return names[static_cast<int>(kernel)];
}

std::string checkProblem(const Problem& p) {
    if (p.N < 0 || p.H < 1 || p.I < 1 || p.E < 1 || p.K < 1)
        return "MixtralMoE: dimensions must be positive (N=" + std::to_string(p.N) + ", H=" + std::to_string(p.H) +
               ", I=" + std::to_string(p.I) + ", E=" + std::to_string(p.E) + ", top_k=" + std::to_string(p.K) + ")";
    if (p.K > p.E)
        return "MixtralMoE: top_k=" + std::to_string(p.K) + " exceeds the " + std::to_string(p.E) + " experts";
    if (p.E > kMaxExperts)
        return "MixtralMoE: " + std::to_string(p.E) + " experts; the compiled routing and alignment kernels hold at "
               "most " + std::to_string(kMaxExperts) + " (AOT_MAX_EXPERTS in mixexport/kernels/configs.py)";
    // The kernels were compiled assuming H and I are multiples of kShapeMultiple (vectorized loads
    // along them; SHAPE_MULTIPLE in mixexport/kernels/configs.py).
    if (p.H % kShapeMultiple || p.I % kShapeMultiple)
        return "MixtralMoE: hidden_size=" + std::to_string(p.H) + " and intermediate_size=" + std::to_string(p.I) +
               " must be multiples of " + std::to_string(kShapeMultiple) +
               " (the compiled kernels vectorize along them)";
    // The scheme of mixexport/quant.py: int8 one scale per row, int4 groups that divide H and I.
    if (p.quant_bits != 0 && p.quant_bits != 8 && p.quant_bits != 4)
        return "MixtralMoE: quant_bits=" + std::to_string(p.quant_bits) + " must be 0, 8 or 4";
    if ((p.quant_bits == 8 && p.group_size != 0) || (p.quant_bits == 0 && p.group_size != 0) ||
        (p.quant_bits == 4 && (p.group_size <= 0 || p.H % p.group_size || p.I % p.group_size)))
        return "MixtralMoE: group_size=" + std::to_string(p.group_size) + " does not fit quant_bits=" +
               std::to_string(p.quant_bits) + " (int8: 0, one scale per row; int4: a group size dividing H=" +
               std::to_string(p.H) + " and I=" + std::to_string(p.I) + ")";
    if (!quantBuilt(p.quant_bits, p.group_size))
        return "MixtralMoE: no GEMM kernels were built for " + quantName(p.quant_bits, p.group_size) +
               " expert weights; rebuild with -DMIXEXPORT_KERNEL_QUANT including it";
    if (!dtypeBuilt(p.dtype)) {
        std::string built;
        for (DType d : kBuiltDTypes) built += std::string(built.empty() ? "" : ", ") + dtypeName(d);
        return std::string("MixtralMoE: no kernels were built for ") + dtypeName(p.dtype) + " (built: " + built +
               "); rebuild with -DMIXEXPORT_KERNEL_DTYPES including it";
    }
    // Slot indices n*K+j and element offsets of y [N*K, H] are int32 in the kernels.
    if (p.N * p.K * std::max(p.H, p.I) > kInt32Max)
        return "MixtralMoE: N*top_k*max(H, I) = " + std::to_string(p.N * p.K * std::max(p.H, p.I)) +
               " exceeds the kernels' int32 indexing; lower the profile's maximum tokens";
    return {};
}

std::string makePlanFor(const Problem& p, int build_arch, Tile tile, bool use_cubin, Plan* plan) {
    if (std::string error = checkProblem(p); !error.empty()) return error;
    const TileSpec* tile_spec = findTile(build_arch, tile);
    if (!tile_spec) return "MixtralMoE: no GEMM tile for sm_" + std::to_string(build_arch) + " in the kernel table";
    Plan out;
    out.problem = p;
    out.build_arch = build_arch;
    out.tile = tile;
    out.block_m = tile_spec->block_m;
    out.split_k = tile_spec->split_k;
    const Dims d = dimsOf(p, tile_spec->block_m, tile_spec->split_k);

    int64_t global_scratch = 0, profile_scratch = 0;
    for (int k = 0; k < kNumKernels; ++k) {
        const Kernel kernel = static_cast<Kernel>(k);
        const VariantSpec* v = findVariant(kernel, build_arch, p, tile);
        if (!v)
            return std::string("MixtralMoE: kernel ") + kernelName(kernel) + " was not built for sm_" +
                   std::to_string(build_arch) + " " + dtypeName(p.dtype) + " " + quantName(p.quant_bits, p.group_size);
        if (v->block_m && v->block_m != tile_spec->block_m)
            return std::string("MixtralMoE: ") + v->name + " was compiled with BLOCK_M=" + std::to_string(v->block_m) +
                   ", its tile says " + std::to_string(tile_spec->block_m);
        Launch& launch = out.launches[k];
        launch.variant = v;
        launch.use_cubin = use_cubin;
        int64_t programs = 1;
        for (int axis = 0; axis < 3; ++axis) {
            const int64_t g = v->grid[axis](d);
            const int64_t limit = axis == 0 ? kInt32Max : 65535;
            if (g < 0 || g > limit)
                return std::string("MixtralMoE: ") + v->name + " grid[" + std::to_string(axis) + "] = " +
                       std::to_string(g) + " is outside CUDA's limit; lower the profile's maximum tokens";
            launch.grid[axis] = static_cast<uint32_t>(g);
            programs *= g;
        }
        launch.block = static_cast<uint32_t>(v->threads_per_block);
        launch.shared_bytes = static_cast<uint32_t>(v->shared_memory_bytes);
        // Triton sizes its scratch per program (as its own launcher allocates it).
        global_scratch = std::max(global_scratch, v->global_scratch_bytes * programs);
        profile_scratch = std::max(profile_scratch, v->profile_scratch_bytes * programs);
    }
    out.num_launches = p.N == 0 ? 0 : kNumKernels;

    WorkspaceLayout& ws = out.workspace;
    size_t offset = 0;
    ws.num_buffers = kNumWorkspaceBuffers;
    static_assert(kNumWorkspaceBuffers <= kMaxWorkspaceBuffers, "more workspace buffers than WorkspaceLayout holds");
    for (int b = 0; b < kNumWorkspaceBuffers; ++b) {
        const size_t bytes = static_cast<size_t>(kWorkspaceBuffers[b].bytes(d));
        ws.buffers[b] = Slice{kWorkspaceBuffers[b].name, offset, bytes};
        offset = alignUp(offset + bytes);
    }
    ws.global_scratch = Slice{"global_scratch", global_scratch ? offset : 0, static_cast<size_t>(global_scratch)};
    offset = alignUp(offset + ws.global_scratch.bytes);
    ws.profile_scratch = Slice{"profile_scratch", profile_scratch ? offset : 0, static_cast<size_t>(profile_scratch)};
    offset = alignUp(offset + ws.profile_scratch.bytes);
    ws.total_bytes = offset;
    *plan = out;
    return {};
}

std::string chooseBuild(const Device& device, int* build_arch, bool* use_cubin) {
    if (device.arch < 80)
        return "MixtralMoE: the compiled MoE kernels need an sm_80 or newer GPU, this one is sm_" +
               std::to_string(device.arch);
    if (archBuilt(device.arch)) {
        *build_arch = device.arch;
        *use_cubin = true;
        return {};
    }
    // Arch-specific PTX (sm_90a) cannot move to another GPU; every dtype's variants must be portable
    // because the kernels are loaded before the plugin sees its tensors' dtype.
    int best = 0;
    for (int arch : kBuiltArchs) {
        if (arch > device.arch || arch <= best) continue;
        bool portable = true;
        for (const VariantSpec& v : kVariants)
            if (v.arch == arch) portable &= v.ptx_portable;
        if (portable) best = arch;
    }
    if (!best)
        return "MixtralMoE: no kernels for this sm_" + std::to_string(device.arch) + " GPU (built: " + builtArchList() +
               "); rebuild with -DMIXEXPORT_CUDA_ARCHS including " + std::to_string(device.arch);
    *build_arch = best;
    *use_cubin = false;
    return {};
}

std::string checkDriver(int driver_version, int build_arch, bool use_cubin) {
    int needed = 0;
    const char* ptxas = "";
    for (const VariantSpec& v : kVariants) {
        if (v.arch != build_arch) continue;
        const int version = use_cubin ? v.cuda_for_cubin : v.cuda_for_ptx;
        if (version > needed) {
            needed = version;
            ptxas = v.ptxas_version;
        }
    }
    if (driver_version >= needed) return {};
    auto show = [](int version) { return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10); };
    // The first driver branch of each CUDA major release (what minor version compatibility needs for a cubin).
    const char* branch = needed == 13000 ? " (driver R580 or newer)" : needed == 12000 ? " (driver R525 or newer)" : "";
    return std::string("MixtralMoE: the sm_") + std::to_string(build_arch) + (use_cubin ? " cubins" : " PTX") +
           " were compiled by ptxas " + ptxas + " and need a driver for CUDA " + show(needed) + branch +
           ", this one supports CUDA " + show(driver_version) +
           "; update the NVIDIA driver or rebuild the kernels with an older ptxas (-DMIXEXPORT_PTXAS=, see "
           "plugins/moe/README.md)";
}

std::string makePlan(const Problem& p, const Device& device, Plan* plan) {
    int build_arch = 0;
    bool use_cubin = true;
    if (std::string error = chooseBuild(device, &build_arch, &use_cubin); !error.empty()) return error;
    // index.json tile_rule: the tile follows the routed slots per expert.
    const Tile tile = p.N * p.K <= kSmallMMaxSlotsPerExpert * p.E ? Tile::kSmallM : Tile::kLargeM;
    if (std::string error = makePlanFor(p, build_arch, tile, use_cubin, plan); !error.empty()) return error;
    if (device.max_shared_optin > 0) {
        for (const Launch& launch : plan->launches) {
            if (launch.shared_bytes > device.max_shared_optin)
                return std::string("MixtralMoE: ") + launch.variant->name + " needs " +
                       std::to_string(launch.shared_bytes) + " bytes of shared memory, this sm_" +
                       std::to_string(device.arch) + " GPU allows " + std::to_string(device.max_shared_optin) +
                       "; rebuild with -DMIXEXPORT_CUDA_ARCHS including " + std::to_string(device.arch);
        }
    }
    return {};
}

std::string workspaceBound(const Problem& p, size_t* bytes) {
    size_t bound = 0;
    for (int arch : kBuiltArchs) {
        for (Tile tile : {Tile::kSmallM, Tile::kLargeM}) {
            Plan plan;
            if (std::string error = makePlanFor(p, arch, tile, true, &plan); !error.empty()) return error;
            bound = std::max(bound, plan.workspace.total_bytes);
        }
    }
    *bytes = bound;
    return {};
}

std::string bindArgs(const Plan& plan, int launch, const Tensors& t, KernelArgs* args) {
    if (launch < 0 || launch >= plan.num_launches) return "MixtralMoE: launch index out of range";
    const VariantSpec& v = *plan.launches[launch].variant;
    if (v.num_params > kMaxParams) return std::string("MixtralMoE: ") + v.name + " has too many parameters";
    const Dims d = dimsOf(plan.problem, plan.block_m, plan.split_k);
    const WorkspaceLayout& ws = plan.workspace;
    args->count = v.num_params;
    for (int i = 0; i < v.num_params; ++i) {
        const ParamSpec& param = v.params[i];
        KernelArgs::Slot& slot = args->values[i];
        slot.ptr = 0;
        switch (param.kind) {
            case BindKind::kInput: slot.ptr = t.inputs[param.index]; break;
            case BindKind::kOutput: slot.ptr = t.output; break;
            case BindKind::kWorkspace: slot.ptr = t.workspace + ws.buffers[param.index].offset; break;
            case BindKind::kScratch: {
                const Slice& s = param.index == 0 ? ws.global_scratch : ws.profile_scratch;
                slot.ptr = s.bytes ? t.workspace + s.offset : 0;
                break;
            }
            case BindKind::kScalar: {
                const int64_t value = param.value(d);
                if (value < std::numeric_limits<int32_t>::min() || value > kInt32Max)
                    return std::string("MixtralMoE: ") + v.name + " parameter " + param.name + " = " +
                           std::to_string(value) + " does not fit int32";
                if (param.divisibility > 1 && value % param.divisibility)
                    return std::string("MixtralMoE: ") + v.name + " parameter " + param.name + " = " +
                           std::to_string(value) + " is not a multiple of " + std::to_string(param.divisibility);
                slot.i32 = static_cast<int32_t>(value);
                break;
            }
        }
        if (param.is_pointer && param.kind != BindKind::kScratch && param.divisibility > 1 &&
            slot.ptr % static_cast<uint64_t>(param.divisibility))
            return std::string("MixtralMoE: ") + v.name + " parameter " + param.name + " address is not " +
                   std::to_string(param.divisibility) + "-byte aligned (the kernels were compiled assuming it is)";
    }
    return {};
}

}  // namespace moe
}  // namespace mixexport
