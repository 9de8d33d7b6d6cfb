// MixtralMoE as a TensorRT IPluginV3 (IPluginV3OneCore/Build/Runtime) with its IPluginCreatorV3One.
// The plugin is glue: shapes and fields are checked here, the work is the launch plan
// (moe_plan.h) run by the driver-API launcher (moe_launcher.h) on TensorRT's stream.
// Field names, plugin name, namespace and version come from the generated header, which
// gen_kernels.py writes from mixexport/targets/trt/plugin_contract.json.
#include <NvInferRuntime.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "moe_kernels_generated.h"
#include "moe_launcher.h"
#include "moe_plan.h"

namespace mixexport {
namespace moe {
namespace {

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;

constexpr int32_t kNbInputs = 4;

void reportError(const std::string& message) {
    // The registry's recorder reaches the application's logger; stderr when there is none.
    // kINVALID_ARGUMENT, not kINTERNAL_ERROR: the latter tells TensorRT its own state is corrupt.
    nvinfer1::IErrorRecorder* recorder = getPluginRegistry() ? getPluginRegistry()->getErrorRecorder() : nullptr;
    if (recorder) {
        recorder->reportError(nvinfer1::ErrorCode::kINVALID_ARGUMENT, message.c_str());
    } else {
        std::fprintf(stderr, "[mixexport] %s\n", message.c_str());
    }
}

bool toDType(DataType type, DType* dtype) {
    switch (type) {
        case DataType::kHALF: *dtype = DType::kFP16; return true;
        case DataType::kBF16: *dtype = DType::kBF16; return true;
        case DataType::kFLOAT: *dtype = DType::kFP32; return true;
        default: return false;
    }
}

bool dtypeBuilt(DType dtype) {
    for (DType d : kBuiltDTypes)
        if (d == dtype) return true;
    return false;
}

// The plugin's fields, in contract order (Field enum from the generated header).
struct Fields {
    std::array<int32_t, kNumFields> values{};

    int64_t topK() const { return values[kField_top_k]; }
    bool normalize() const { return values[kField_normalize] != 0; }
    int64_t E() const { return values[kField_num_experts]; }
    int64_t H() const { return values[kField_hidden_size]; }
    int64_t I() const { return values[kField_intermediate_size]; }

    Problem problem(int64_t tokens, DType dtype) const { return Problem{tokens, H(), I(), E(), topK(), normalize(), dtype}; }

    // Checks everything that does not depend on N or the dtype.
    std::string check() const {
        if (values[kField_normalize] != 0 && values[kField_normalize] != 1)
            return "MixtralMoE: normalize=" + std::to_string(values[kField_normalize]) + " must be 0 or 1";
        return checkProblem(problem(0, kBuiltDTypes[0]));
    }
};

// Expected shape of each input from the fields, -1 for N (any).
std::array<std::array<int64_t, 3>, kNbInputs> expectedShapes(const Fields& f) {
    return {{{-1, f.H(), 0}, {-1, f.E(), 0}, {f.E(), 2 * f.I(), f.H()}, {f.E(), f.H(), f.I()}}};
}

std::string checkShapes(const Fields& f, const nvinfer1::Dims* const dims[kNbInputs]) {
    const auto expected = expectedShapes(f);
    const int ranks[kNbInputs] = {2, 2, 3, 3};
    for (int i = 0; i < kNbInputs; ++i) {
        const nvinfer1::Dims& d = *dims[i];
        bool ok = d.nbDims == ranks[i];
        for (int a = 0; ok && a < ranks[i]; ++a)
            ok = expected[i][a] < 0 || d.d[a] < 0 || d.d[a] == expected[i][a];  // -1: not known yet
        if (!ok) {
            std::string got;
            for (int a = 0; a < d.nbDims; ++a) got += (a ? ", " : "") + std::to_string(d.d[a]);
            return std::string("MixtralMoE: input ") + kInputNames[i] + " has shape [" + got +
                   "], expected x [N, H], router_logits [N, E], w_gate_up [E, 2I, H], w_down [E, H, I] with H=" +
                   std::to_string(f.H()) + ", I=" + std::to_string(f.I()) + ", E=" + std::to_string(f.E());
        }
    }
    if (dims[0]->d[0] >= 0 && dims[1]->d[0] >= 0 && dims[0]->d[0] != dims[1]->d[0])
        return "MixtralMoE: x has " + std::to_string(dims[0]->d[0]) + " rows but router_logits has " +
               std::to_string(dims[1]->d[0]);
    return {};
}

class MixtralMoEPlugin final : public nvinfer1::IPluginV3,
                               public nvinfer1::IPluginV3OneCore,
                               public nvinfer1::IPluginV3OneBuild,
                               public nvinfer1::IPluginV3OneRuntime {
public:
    explicit MixtralMoEPlugin(const Fields& fields) : fields_(fields) {
        for (int i = 0; i < kNumFields; ++i)
            serialized_[i] = PluginField(kFieldNames[i], &fields_.values[i], PluginFieldType::kINT32, 1);
        collection_.nbFields = kNumFields;
        collection_.fields = serialized_.data();
    }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
        switch (type) {
            case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
            case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
            case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override {
        try {
            return new MixtralMoEPlugin(fields_);
        } catch (...) {
            return nullptr;
        }
    }

    // IPluginV3OneCore
    const char* getPluginName() const noexcept override { return kPluginName; }
    const char* getPluginVersion() const noexcept override { return kPluginVersion; }
    const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return 1; }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, const DataType* inputTypes,
                               int32_t nbInputs) const noexcept override {
        if (nbOutputs != 1 || nbInputs != kNbInputs) return -1;
        outputTypes[0] = inputTypes[0];
        return 0;
    }

    int32_t getOutputShapes(const DimsExprs* inputs, int32_t nbInputs, const DimsExprs* /*shapeInputs*/,
                            int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 1 || inputs[0].nbDims != 2) {
            reportError("MixtralMoE: expects 4 inputs (x [N, H], router_logits, w_gate_up, w_down) and 1 output");
            return -1;
        }
        outputs[0] = inputs[0];  // y [N, H]
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs) return false;
        const PluginTensorDesc& desc = inOut[pos].desc;
        if (desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
        DType dtype;
        if (!toDType(desc.type, &dtype) || !dtypeBuilt(dtype)) return false;
        // One dtype for every input and the output: the GEMMs and the routing read x's dtype.
        return pos == 0 || desc.type == inOut[0].desc.type;
    }

    int32_t configurePlugin(const DynamicPluginTensorDesc* in, int32_t nbInputs, const DynamicPluginTensorDesc* out,
                            int32_t nbOutputs) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 1) return -1;
        const nvinfer1::Dims* dims[kNbInputs] = {&in[0].desc.dims, &in[1].desc.dims, &in[2].desc.dims,
                                                 &in[3].desc.dims};
        std::string error = checkShapes(fields_, dims);
        DType dtype;
        if (error.empty() && !toDType(in[0].desc.type, &dtype))
            error = "MixtralMoE: x must be float16, bfloat16 or float32";
        if (error.empty()) error = checkProblem(fields_.problem(in[0].max.d[0] < 0 ? 0 : in[0].max.d[0], dtype));
        if (!error.empty()) {
            reportError(error);
            return -1;
        }
        (void)out;
        return 0;
    }

    size_t getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nbInputs,
                            const DynamicPluginTensorDesc* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override {
        DType dtype;
        if (nbInputs != kNbInputs || !toDType(inputs[0].desc.type, &dtype)) return 0;
        // The profile's largest N bounds every N the engine will see, on any arch and tile.
        size_t bytes = 0;
        if (std::string error = workspaceBound(fields_.problem(inputs[0].max.d[0], dtype), &bytes); !error.empty()) {
            reportError(error);
            return 0;
        }
        return bytes;
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(const PluginTensorDesc* in, int32_t nbInputs, const PluginTensorDesc* /*out*/,
                          int32_t nbOutputs) noexcept override {
        if (nbInputs != kNbInputs || nbOutputs != 1) return -1;
        const nvinfer1::Dims* dims[kNbInputs] = {&in[0].dims, &in[1].dims, &in[2].dims, &in[3].dims};
        if (std::string error = checkShapes(fields_, dims); !error.empty()) {
            reportError(error);
            return -1;
        }
        return 0;
    }

    int32_t enqueue(const PluginTensorDesc* inputDesc, const PluginTensorDesc* /*outputDesc*/,
                    const void* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override {
        try {
            DType dtype;
            if (!toDType(inputDesc[0].type, &dtype)) return -1;
            Device device;
            Plan plan;
            std::string error = launcher_.currentDevice(&device);
            if (error.empty()) error = makePlan(fields_.problem(inputDesc[0].dims.d[0], dtype), device, &plan);
            Tensors tensors;
            for (int i = 0; i < kNbInputs; ++i) tensors.inputs[i] = reinterpret_cast<uint64_t>(inputs[i]);
            tensors.output = reinterpret_cast<uint64_t>(outputs[0]);
            tensors.workspace = reinterpret_cast<uint64_t>(workspace);
            // cudaStream_t and CUstream name the same driver object.
            if (error.empty()) error = launcher_.launch(plan, tensors, reinterpret_cast<CUstream>(stream));
            if (!error.empty()) {
                reportError(error);
                return -1;
            }
            return 0;
        } catch (...) {
            reportError("MixtralMoE: enqueue failed (out of host memory)");
            return -1;
        }
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override {
        return clone();
    }

    const PluginFieldCollection* getFieldsToSerialize() noexcept override { return &collection_; }

private:
    Fields fields_;
    std::array<PluginField, kNumFields> serialized_;
    PluginFieldCollection collection_{};
    KernelLauncher launcher_;  // per plugin instance: its module cache is per CUDA context
};

class MixtralMoECreator final : public nvinfer1::IPluginCreatorV3One {
public:
    MixtralMoECreator() {
        for (int i = 0; i < kNumFields; ++i)
            fieldNames_[i] = PluginField(kFieldNames[i], nullptr, PluginFieldType::kINT32, 1);
        collection_.nbFields = kNumFields;
        collection_.fields = fieldNames_.data();
    }

    nvinfer1::IPluginV3* createPlugin(const char* /*name*/, const PluginFieldCollection* fc,
                                      nvinfer1::TensorRTPhase /*phase*/) noexcept override {
        try {
            Fields fields;
            std::array<bool, kNumFields> seen{};
            for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
                const PluginField& field = fc->fields[i];
                for (int f = 0; f < kNumFields; ++f) {
                    if (std::strcmp(field.name, kFieldNames[f]) != 0) continue;
                    // The ONNX parser passes int attributes as INT32; accept INT64 from other front ends.
                    if (field.length != 1 || !field.data ||
                        (field.type != PluginFieldType::kINT32 && field.type != PluginFieldType::kINT64)) {
                        reportError(std::string("MixtralMoE: field ") + field.name + " must be one integer");
                        return nullptr;
                    }
                    fields.values[f] = field.type == PluginFieldType::kINT32
                                           ? *static_cast<const int32_t*>(field.data)
                                           : static_cast<int32_t>(*static_cast<const int64_t*>(field.data));
                    seen[f] = true;
                }
            }
            for (int f = 0; f < kNumFields; ++f) {
                if (!seen[f]) {
                    reportError(std::string("MixtralMoE: missing field ") + kFieldNames[f] +
                                " (see mixexport/targets/trt/plugin_contract.json)");
                    return nullptr;
                }
            }
            if (std::string error = fields.check(); !error.empty()) {
                reportError(error);
                return nullptr;
            }
            return new MixtralMoEPlugin(fields);
        } catch (...) {
            return nullptr;
        }
    }

    const PluginFieldCollection* getFieldNames() noexcept override { return &collection_; }
    const char* getPluginName() const noexcept override { return kPluginName; }
    const char* getPluginVersion() const noexcept override { return kPluginVersion; }
    const char* getPluginNamespace() const noexcept override { return kPluginNamespace; }

private:
    std::array<PluginField, kNumFields> fieldNames_;
    PluginFieldCollection collection_{};
};

}  // namespace
}  // namespace moe
}  // namespace mixexport

// Registers the creator when the library is loaded (trtexec --staticPlugins, Polygraphy --plugins,
// Triton's plugins= option, or dlopen by an application).
// The macro pastes its argument into a variable name, so it takes an unqualified name.
using mixexport::moe::MixtralMoECreator;
REGISTER_TENSORRT_PLUGIN(MixtralMoECreator);
