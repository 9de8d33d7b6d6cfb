// Launch plan: variant choice, grids, workspace layout and argument order against hand-computed
// values (Mixtral 8x7B shapes) and against the generated metadata table.
#include <algorithm>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "moe_kernels_generated.h"
#include "moe_plan.h"
#include "test_harness.h"

using namespace mixexport::moe;

namespace {

bool built(int arch, DType dtype) {
    return std::find(std::begin(kBuiltArchs), std::end(kBuiltArchs), arch) != std::end(kBuiltArchs) &&
           std::find(std::begin(kBuiltDTypes), std::end(kBuiltDTypes), dtype) != std::end(kBuiltDTypes);
}

Problem mixtral(int64_t n) { return Problem{n, 4096, 14336, 8, 2, true, DType::kFP16}; }

std::vector<std::string> paramNames(const VariantSpec& v) {
    std::vector<std::string> names;
    for (int i = 0; i < v.num_params; ++i) names.push_back(v.params[i].name);
    return names;
}

const Slice& buffer(const Plan& plan, const char* name) {
    for (int b = 0; b < plan.workspace.num_buffers; ++b)
        if (std::strcmp(plan.workspace.buffers[b].name, name) == 0) return plan.workspace.buffers[b];
    static Slice none;
    return none;
}

// Decode on sm_90: N=3 tokens, N*K=6 slots <= 32*E -> small_m tile (BLOCK_M 16, BLOCK_N 128, down split 4).
void decodeOnHopper() {
    if (!built(90, DType::kFP16)) return;
    Plan plan;
    CHECK_EQ(makePlan(mixtral(3), Device{90, 227 * 1024}, &plan), std::string());
    CHECK(plan.build_arch == 90 && plan.tile == Tile::kSmallM && plan.block_m == 16 && plan.split_k == 4);
    CHECK_EQ(plan.num_launches, 6);
    // cdiv(6, 16) + min(E, 6) = 7 blocks; the down GEMM runs each output tile as 4 splits of I.
    const uint32_t grids[6] = {1, 1, 1, (1 + 6) * 112, (1 + 6) * 32 * 4, 3 * 8};
    for (int k = 0; k < 6; ++k) {
        CHECK_EQ(plan.launches[k].grid[0], grids[k]);
        CHECK_EQ(plan.launches[k].grid[1], 1u);
        CHECK(plan.launches[k].use_cubin);
        CHECK(plan.launches[k].variant->kernel == static_cast<Kernel>(k));
    }
    CHECK_EQ(std::string(plan.launches[3].variant->name), std::string("gate_up_small_m_fp16_sm90"));
    CHECK_EQ(plan.launches[3].block, 128u);
    CHECK_EQ(plan.launches[3].shared_bytes, static_cast<uint32_t>(plan.launches[3].variant->shared_memory_bytes));

    // Workspace: each slice on a 256-byte boundary, in index.json order.
    CHECK_EQ(buffer(plan, "topk_weights").offset, 0u);
    CHECK_EQ(buffer(plan, "topk_weights").bytes, 24u);
    CHECK_EQ(buffer(plan, "topk_ids").offset, 256u);
    CHECK_EQ(buffer(plan, "chunk_counts").offset, 512u);
    CHECK_EQ(buffer(plan, "chunk_counts").bytes, 256u);  // 1 chunk x 64 experts x 4 B
    CHECK_EQ(buffer(plan, "sorted_ids").offset, 768u);
    CHECK_EQ(buffer(plan, "sorted_ids").bytes, 448u);  // 7 blocks x 16 rows x 4 B
    CHECK_EQ(buffer(plan, "expert_ids").offset, 1280u);
    CHECK_EQ(buffer(plan, "expert_ids").bytes, 28u);
    CHECK_EQ(buffer(plan, "act").offset, 1536u);
    CHECK_EQ(buffer(plan, "act").bytes, 7u * 16 * 14336 * 2);
    CHECK_EQ(buffer(plan, "y").offset, 1536u + 7 * 16 * 14336 * 2);
    CHECK_EQ(buffer(plan, "y").bytes, 4u * 6 * 4096 * 4);  // one fp32 partial per split
    CHECK_EQ(plan.workspace.global_scratch.bytes, 0u);
    CHECK_EQ(plan.workspace.total_bytes, 3606016u);

    // gate_up arguments in the compiled order, scratch pointers null (size 0).
    Tensors t;
    for (int i = 0; i < 4; ++i) t.inputs[i] = 0x100000ull * (i + 1);
    t.output = 0x900000;
    t.workspace = 0x1000000;
    KernelArgs args;
    CHECK_EQ(bindArgs(plan, 3, t, &args), std::string());
    const std::vector<std::string> expected = {"x_ptr", "w_ptr", "sorted_ids_ptr", "expert_ids_ptr", "act_ptr",
                                               "num_slots", "H", "I", "K", "global_scratch", "profile_scratch"};
    CHECK(paramNames(*plan.launches[3].variant) == expected);
    CHECK_EQ(args.count, 11);
    CHECK_EQ(args.values[0].ptr, 0x100000ull);
    CHECK_EQ(args.values[1].ptr, 0x300000ull);
    CHECK_EQ(args.values[2].ptr, 0x1000000ull + 768);
    CHECK_EQ(args.values[3].ptr, 0x1000000ull + 1280);
    CHECK_EQ(args.values[4].ptr, 0x1000000ull + 1536);
    CHECK_EQ(args.values[5].i32, 6);
    CHECK_EQ(args.values[6].i32, 4096);
    CHECK_EQ(args.values[7].i32, 14336);
    CHECK_EQ(args.values[8].i32, 2);
    CHECK_EQ(args.values[9].ptr, 0ull);
    CHECK_EQ(args.values[10].ptr, 0ull);
    void** params = args.kernelParams();
    CHECK_EQ(*static_cast<int32_t*>(params[6]), 4096);
    CHECK_EQ(*static_cast<uint64_t*>(params[4]), 0x1000000ull + 1536);

    // routing: logits, weights, ids, N, E, K, normalize; topk_reduce writes the output.
    CHECK_EQ(bindArgs(plan, 0, t, &args), std::string());
    CHECK_EQ(args.values[0].ptr, 0x200000ull);
    CHECK_EQ(args.values[3].i32, 3);
    CHECK_EQ(args.values[6].i32, 1);
    // topk_reduce: y, out, num_slots, H, K, split_k (it adds the down GEMM's 4 partials).
    CHECK_EQ(bindArgs(plan, 5, t, &args), std::string());
    CHECK_EQ(args.values[1].ptr, 0x900000ull);
    CHECK_EQ(args.values[2].i32, 6);
    CHECK_EQ(args.values[5].i32, 4);
    // align_scatter gets the GEMM tile's BLOCK_M.
    CHECK_EQ(bindArgs(plan, 2, t, &args), std::string());
    CHECK_EQ(args.values[6].i32, 16);

    t.inputs[0] += 8;  // x no longer 16-byte aligned
    CHECK_CONTAINS(bindArgs(plan, 3, t, &args), "16-byte aligned");
}

// Prefill on sm_80: N=512, N*K=1024 slots > 32*E -> large_m tile (BLOCK_M 64, BLOCK_N 128, no split).
void prefillOnAmpere() {
    if (!built(80, DType::kFP16)) return;
    Plan plan;
    CHECK_EQ(makePlan(mixtral(512), Device{80, 163 * 1024}, &plan), std::string());
    CHECK(plan.build_arch == 80 && plan.tile == Tile::kLargeM && plan.block_m == 64 && plan.split_k == 1);
    CHECK_EQ(plan.launches[0].grid[0], 32u);                 // cdiv(512, 16)
    CHECK_EQ(plan.launches[1].grid[0], 4u);                  // cdiv(1024, 256)
    CHECK_EQ(plan.launches[3].grid[0], (16u + 8) * 112);     // (cdiv(1024,64)+min(E,1024)) * cdiv(14336,128)
    CHECK_EQ(plan.launches[4].grid[0], (16u + 8) * 32);      // (cdiv(1024,64)+min(E,1024)) * cdiv(4096,128)
    CHECK_EQ(plan.launches[5].grid[0], 512u * 8);
    CHECK_EQ(buffer(plan, "chunk_counts").bytes, 4u * 64 * 4);
    CHECK_EQ(buffer(plan, "sorted_ids").bytes, 24u * 64 * 4);
    CHECK_EQ(std::string(plan.launches[4].variant->name), std::string("down_large_m_fp16_sm80"));
    // Tile boundary: 128 tokens x 2 = 256 slots = 32 per expert is still small_m, 129 tokens is not;
    // with 64 experts the same batch is 4 slots per expert, small_m.
    CHECK_EQ(makePlan(mixtral(128), Device{80, 0}, &plan), std::string());
    CHECK(plan.tile == Tile::kSmallM);
    CHECK_EQ(makePlan(mixtral(129), Device{80, 0}, &plan), std::string());
    CHECK(plan.tile == Tile::kLargeM);
    Problem many = mixtral(129);
    many.E = 64;
    CHECK_EQ(makePlan(many, Device{80, 0}, &plan), std::string());
    CHECK(plan.tile == Tile::kSmallM);
}

void variantChoice() {
    Plan plan;
    if (built(80, DType::kFP16) && !built(86, DType::kFP16)) {
        // sm_86 without its own build: sm_80's PTX, JIT-compiled by the driver ...
        CHECK_EQ(makePlan(mixtral(512), Device{86, 0}, &plan), std::string());
        CHECK(plan.build_arch == 80 && !plan.launches[0].use_cubin);
        // ... unless its tiles need more shared memory than sm_86 has.
        CHECK_CONTAINS(makePlan(mixtral(4), Device{86, 99 * 1024}, &plan), "bytes of shared memory");
    }
    if (built(80, DType::kFP16) && built(90, DType::kFP16)) {
        // sm_90a PTX cannot be JIT-compiled for sm_100: the newest portable PTX (sm_89 or sm_80) runs there.
        int newest_portable = 0;
        for (int arch : kBuiltArchs)
            if (arch != 90) newest_portable = std::max(newest_portable, arch);
        CHECK_EQ(makePlan(mixtral(4), Device{100, 0}, &plan), std::string());
        CHECK_EQ(plan.build_arch, newest_portable);
        CHECK(!plan.launches[3].use_cubin);
    }
    CHECK_CONTAINS(makePlan(mixtral(4), Device{75, 0}, &plan), "sm_80 or newer");
}

void problemChecks() {
    Plan plan;
    Problem p = mixtral(4);
    p.H = 4008;
    CHECK_CONTAINS(checkProblem(p), "multiples of 16");
    p = mixtral(4);
    p.E = kMaxExperts + 1;
    p.K = 2;
    CHECK_CONTAINS(checkProblem(p), "experts");
    p = mixtral(4);
    p.K = 9;
    CHECK_CONTAINS(checkProblem(p), "top_k=9");
    p = mixtral(4);
    p.dtype = DType::kFP32;
    if (!built(kBuiltArchs[0], DType::kFP32)) CHECK_CONTAINS(checkProblem(p), "MIXEXPORT_KERNEL_DTYPES");
    p = mixtral(1 << 20);
    CHECK_CONTAINS(checkProblem(p), "int32");
    // No tokens: a valid plan with nothing to launch.
    CHECK_EQ(makePlanFor(mixtral(0), kBuiltArchs[0], Tile::kSmallM, true, &plan), std::string());
    CHECK_EQ(plan.num_launches, 0);
}

// The bound from the profile's largest N covers every smaller N on every arch and tile.
void workspaceCoversProfile() {
    size_t bound = 0;
    CHECK_EQ(workspaceBound(mixtral(512), &bound), std::string());
    for (int64_t n : {0, 1, 2, 63, 128, 129, 300, 511, 512}) {
        for (int arch : kBuiltArchs) {
            Plan plan;
            CHECK_EQ(makePlan(mixtral(n), Device{arch, 0}, &plan), std::string());
            CHECK(plan.workspace.total_bytes <= bound);
            CHECK_EQ(plan.workspace.total_bytes % kWorkspaceAlignment, 0u);
        }
    }
}

// Every generated variant is consistent with its own metadata: scratch pointers last, the GEMM
// tiles' BLOCK_M agree with the tile table, shared memory fits the arch.
void tableIsConsistent() {
    for (const VariantSpec& v : kVariants) {
        CHECK(v.num_params >= 2);
        CHECK_EQ(std::string(v.params[v.num_params - 2].name), std::string("global_scratch"));
        CHECK_EQ(std::string(v.params[v.num_params - 1].name), std::string("profile_scratch"));
        CHECK(v.cubin_size > 4 && v.cubin[0] == 0x7f && v.cubin[1] == 'E');
        CHECK(std::strstr(v.ptx, v.entry) != nullptr);
        if (v.tile != Tile::kNone) {
            bool found = false;
            for (const TileSpec& t : kTiles) found |= t.arch == v.arch && t.tile == v.tile && t.block_m == v.block_m;
            CHECK(found);
        }
    }
}

}  // namespace

int main() {
    decodeOnHopper();
    prefillOnAmpere();
    variantChoice();
    problemChecks();
    workspaceCoversProfile();
    tableIsConsistent();
    return finish("test_moe_plan");
}
