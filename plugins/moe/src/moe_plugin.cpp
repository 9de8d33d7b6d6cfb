// MixtralMoE as a TensorRT IPluginV3 (IPluginV3OneCore/Build/Runtime) with its IPluginCreatorV3One.
// The plugin is glue: shapes and fields are checked here, the work is the launch plan
// (moe_plan.h) run by the driver-API launcher (moe_launcher.h) on TensorRT's stream.
// Field names, plugin name, namespace and version come from the generated header, which
// gen_kernels.py writes from mixexport/targets/trt/plugin_contract.json.
//
// How the creator reaches TensorRT (both register it under the contract's namespace, the one the
// ONNX node's plugin_namespace names and the parser looks up):
// - loading the library (dlopen, ctypes.CDLL, Polygraphy --plugins, trtexec --staticPlugins,
//   Triton's plugins=) registers it with getPluginRegistry() from a static initializer;
// - IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, version-compatible engines) calls the
//   exported setLoggerFinder and getCreators and registers what getCreators returns; getCreators
//   therefore withdraws the load-time registration first, so the library is registered once.
#include <NvInferRuntime.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>

#include "moe_kernels_generated.h"
#include "moe_launcher.h"
#include "moe_plan.h"

#define MIXEXPORT_EXPORT __attribute__((visibility("default")))

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

// x, router_logits, w_gate_up, w_down, and for quantized experts s_gate_up, s_down (the contract).
constexpr int32_t kMaxInputs = 6;

// The TensorRT interfaces are C++ vtables, and they differ between major versions (TensorRT 11
// dropped IPluginRegistry's IPluginV2 methods and made ILogger a versioned interface): through the
// headers of one major, a library of another would run the wrong methods. So nothing is called on
// a libnvinfer of another major version; getInferLibVersion is a plain C function in every version.
bool sameMajorVersion() {
    static const bool same = getInferLibVersion() / 10000 == NV_TENSORRT_MAJOR;
    return same;
}

std::string versionMismatch() {
    return "MixtralMoE: this plugin library was built for TensorRT " + std::to_string(NV_TENSORRT_MAJOR) +
           ".x but the process runs TensorRT " + std::to_string(getInferLibVersion() / 10000) + "." +
           std::to_string(getInferLibVersion() / 100 % 100) +
           "; rebuild it with -DTensorRT_ROOT pointing at that TensorRT";
}

// Set by IPluginRegistry::loadLibrary: finds the logger of the engine or context calling us.
std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;

// Errors go where the application looks: the execution context's error recorder (runtime), the
// plugin registry's recorder, the logger TensorRT names for the calling engine (loadLibrary), or
// TensorRT's own logger; stderr only when TensorRT is of another major version.
// kINVALID_ARGUMENT, not kINTERNAL_ERROR: the latter tells TensorRT its own state is corrupt.
void reportError(const std::string& message, nvinfer1::IErrorRecorder* recorder = nullptr) {
    if (!sameMajorVersion()) {
        std::fprintf(stderr, "[mixexport] %s\n", message.c_str());
        return;
    }
    if (!recorder && getPluginRegistry()) recorder = getPluginRegistry()->getErrorRecorder();
    if (recorder) {
        recorder->reportError(nvinfer1::ErrorCode::kINVALID_ARGUMENT, message.c_str());
        return;
    }
    nvinfer1::ILogger* logger = nullptr;
    {
        std::lock_guard<std::mutex> lock(gLoggerMutex);
        if (gLoggerFinder) logger = gLoggerFinder->findLogger();
    }
    if (!logger) logger = getLogger();
    if (logger) {
        logger->log(nvinfer1::ILogger::Severity::kERROR, message.c_str());
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

// The plugin's fields, in contract order (Field enum from the generated header). Each fits int32:
// the ONNX parser passes int attributes as INT32 and that is what the plugin serializes.
struct Fields {
    std::array<int32_t, kNumFields> values{};

    int64_t topK() const { return values[kField_top_k]; }
    bool normalize() const { return values[kField_normalize] != 0; }
    int64_t E() const { return values[kField_num_experts]; }
    int64_t H() const { return values[kField_hidden_size]; }
    int64_t I() const { return values[kField_intermediate_size]; }
    int quantBits() const { return values[kField_quant_bits]; }
    int groupSize() const { return values[kField_group_size]; }
    // A quantized node has the two scale inputs too.
    int32_t nbInputs() const { return quantBits() ? kMaxInputs : kNumInputsUnquantized; }

    Problem problem(int64_t tokens, DType dtype) const {
        return Problem{tokens, H(), I(), E(), topK(), normalize(), dtype, quantBits(), groupSize()};
    }

    // Checks everything that does not depend on N or the dtype.
    std::string check() const {
        if (values[kField_normalize] != 0 && values[kField_normalize] != 1)
            return "MixtralMoE: normalize=" + std::to_string(values[kField_normalize]) + " must be 0 or 1";
        return checkProblem(problem(0, kBuiltDTypes[0]));
    }
};

// Reads one integer field; INT64 (other front ends) is range-checked before it is narrowed.
std::string readField(const PluginField& field, int32_t* value) {
    if (field.length != 1 || !field.data ||
        (field.type != PluginFieldType::kINT32 && field.type != PluginFieldType::kINT64))
        return std::string("MixtralMoE: field ") + field.name + " must be one int32 or int64";
    if (field.type == PluginFieldType::kINT32) {
        *value = *static_cast<const int32_t*>(field.data);
        return {};
    }
    const int64_t wide = *static_cast<const int64_t*>(field.data);
    if (wide < std::numeric_limits<int32_t>::min() || wide > std::numeric_limits<int32_t>::max())
        return std::string("MixtralMoE: field ") + field.name + " = " + std::to_string(wide) +
               " is outside the int32 range the kernels index with";
    *value = static_cast<int32_t>(wide);
    return {};
}

std::string parseFields(const PluginFieldCollection* fc, Fields* fields) {
    std::array<bool, kNumFields> seen{};
    for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
        const PluginField& field = fc->fields[i];
        if (!field.name) continue;
        for (int f = 0; f < kNumFields; ++f) {
            if (std::strcmp(field.name, kFieldNames[f]) != 0) continue;
            if (std::string error = readField(field, &fields->values[f]); !error.empty()) return error;
            seen[f] = true;
        }
    }
    for (int f = 0; f < kNumFields; ++f) {
        if (seen[f]) continue;
        if (!kFieldHasDefault[f])
            return std::string("MixtralMoE: missing field ") + kFieldNames[f] +
                   " (see mixexport/targets/trt/plugin_contract.json)";
        fields->values[f] = kFieldDefaults[f];  // absent = the contract's default (quant_bits, group_size: 0)
    }
    return fields->check();
}

// Expected shape of each input from the fields, -1 for N (any). Quantized weights hold bits/8 bytes
// per element along K and one scale per group (group_size 0: per row, so the last dimension is 1).
std::array<std::array<int64_t, 3>, kMaxInputs> expectedShapes(const Fields& f) {
    const int64_t per_byte = f.quantBits() ? 8 / f.quantBits() : 1;
    const int64_t group_h = f.groupSize() ? f.groupSize() : f.H(), group_i = f.groupSize() ? f.groupSize() : f.I();
    return {{{-1, f.H(), 0}, {-1, f.E(), 0}, {f.E(), 2 * f.I(), f.H() / per_byte}, {f.E(), f.H(), f.I() / per_byte},
             {f.E(), 2 * f.I(), f.H() / group_h}, {f.E(), f.H(), f.I() / group_i}}};
}

std::string checkShapes(const Fields& f, const nvinfer1::Dims* const dims[kMaxInputs]) {
    const auto expected = expectedShapes(f);
    const int ranks[kMaxInputs] = {2, 2, 3, 3, 3, 3};
    for (int i = 0; i < f.nbInputs(); ++i) {
        const nvinfer1::Dims& d = *dims[i];
        bool ok = d.nbDims == ranks[i];
        for (int a = 0; ok && a < ranks[i]; ++a)
            ok = expected[i][a] < 0 || d.d[a] < 0 || d.d[a] == expected[i][a];  // -1: not known yet
        if (!ok) {
            std::string got;
            for (int a = 0; a < d.nbDims; ++a) got += (a ? ", " : "") + std::to_string(d.d[a]);
            return std::string("MixtralMoE: input ") + kInputNames[i] + " has shape [" + got + "], expected " +
                   (f.quantBits() ? "x [N, H], router_logits [N, E], w_gate_up [E, 2I, H*bits/8], "
                                    "w_down [E, H, I*bits/8], s_gate_up [E, 2I, H/G], s_down [E, H, I/G]"
                                  : "x [N, H], router_logits [N, E], w_gate_up [E, 2I, H], w_down [E, H, I]") +
                   " with H=" + std::to_string(f.H()) + ", I=" + std::to_string(f.I()) + ", E=" +
                   std::to_string(f.E()) +
                   (f.quantBits() ? ", bits=" + std::to_string(f.quantBits()) + ", G=" +
                                        std::to_string(f.groupSize()) + " (0: per row)"
                                  : std::string());
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
    MixtralMoEPlugin(const Fields& fields, nvinfer1::TensorRTPhase phase) : fields_(fields), phase_(phase) {
        for (int i = 0; i < kNumFields; ++i)
            serialized_[i] = PluginField(kFieldNames[i], &fields_.values[i], PluginFieldType::kINT32, 1);
        collection_.nbFields = kNumFields;
        collection_.fields = serialized_.data();
    }

    MixtralMoEPlugin(const MixtralMoEPlugin& other) : MixtralMoEPlugin(other.fields_, other.phase_) {
        launcher_ = other.launcher_;  // the same context's modules, shared
        recorder_ = other.recorder_;
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
            return new MixtralMoEPlugin(*this);
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
        if (nbOutputs != 1 || nbInputs != fields_.nbInputs()) return -1;
        outputTypes[0] = inputTypes[0];
        return 0;
    }

    int32_t getOutputShapes(const DimsExprs* inputs, int32_t nbInputs, const DimsExprs* /*shapeInputs*/,
                            int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override {
        if (nbInputs != fields_.nbInputs() || nbOutputs != 1 || inputs[0].nbDims != 2 || inputs[1].nbDims != 2) {
            reportError(fields_.quantBits()
                            ? "MixtralMoE: quant_bits=" + std::to_string(fields_.quantBits()) +
                                  " expects 6 inputs (x [N, H], router_logits [N, E], w_gate_up, w_down, s_gate_up, "
                                  "s_down) and 1 output"
                            : std::string("MixtralMoE: expects 4 inputs (x [N, H], router_logits [N, E], w_gate_up, "
                                          "w_down) and 1 output"));
            return -1;
        }
        const nvinfer1::IDimensionExpr* hidden = inputs[0].d[1];
        if (hidden->isConstant() && hidden->getConstantValue() != fields_.H()) {
            reportError("MixtralMoE: x has " + std::to_string(hidden->getConstantValue()) +
                        " columns but hidden_size is " + std::to_string(fields_.H()));
            return -1;
        }
        // y [N, H]: N as x's, H the field's value, so y's width is a build-time constant even when
        // the network left x's symbolic.
        const nvinfer1::IDimensionExpr* width = exprBuilder.constant(fields_.H());
        if (!width) return -1;
        outputs[0].nbDims = 2;
        outputs[0].d[0] = inputs[0].d[0];
        outputs[0].d[1] = width;
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        if (nbInputs != fields_.nbInputs() || nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs) return false;
        const PluginTensorDesc& desc = inOut[pos].desc;
        if (desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
        // Quantized experts: the weights are uint8 bytes; their scales, like everything else, x's dtype.
        if (fields_.quantBits() && (pos == 2 || pos == 3)) return desc.type == DataType::kUINT8;
        DType dtype;
        if (!toDType(desc.type, &dtype) || !dtypeBuilt(dtype)) return false;
        // One dtype for every input and the output: the GEMMs and the routing read x's dtype.
        return pos == 0 || desc.type == inOut[0].desc.type;
    }

    int32_t configurePlugin(const DynamicPluginTensorDesc* in, int32_t nbInputs, const DynamicPluginTensorDesc* out,
                            int32_t nbOutputs) noexcept override {
        if (nbInputs != fields_.nbInputs() || nbOutputs != 1) return -1;
        const nvinfer1::Dims* dims[kMaxInputs] = {};
        for (int i = 0; i < nbInputs; ++i) dims[i] = &in[i].desc.dims;
        std::string error = checkShapes(fields_, dims);
        DType dtype = DType::kFP16;  // set by toDType whenever error stays empty
        if (error.empty() && !toDType(in[0].desc.type, &dtype))
            error = "MixtralMoE: x must be float16 or bfloat16";
        for (int i = 1; error.empty() && i < nbInputs; ++i) {
            const bool bytes = fields_.quantBits() && (i == 2 || i == 3);
            if (in[i].desc.type != (bytes ? DataType::kUINT8 : in[0].desc.type))
                error = std::string("MixtralMoE: input ") + kInputNames[i] + " must be " +
                        (bytes ? "uint8 (quantized expert weights)" : "in x's dtype");
        }
        if (error.empty()) error = checkProblem(fields_.problem(in[0].max.d[0] < 0 ? 0 : in[0].max.d[0], dtype));
        // The builder times the plugin on this context: its kernels are loaded now, not in enqueue
        // (on a thread without a current context, by the first enqueue instead).
        if (error.empty()) error = launcher_.attach(/*later_without_context=*/true);
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
        if (nbInputs != fields_.nbInputs() || !toDType(inputs[0].desc.type, &dtype)) return 0;
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
        if (nbInputs != fields_.nbInputs() || nbOutputs != 1) return -1;
        const nvinfer1::Dims* dims[kMaxInputs] = {};
        for (int i = 0; i < nbInputs; ++i) dims[i] = &in[i].dims;
        if (std::string error = checkShapes(fields_, dims); !error.empty()) {
            reportError(error, recorder_);
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
            std::string error;
            // Loaded here only by build-phase copies the builder made before configurePlugin (no
            // application stream is being captured during a build) and by copies that were attached
            // on a thread without a current CUDA context; a runtime copy never attached is refused.
            if (!launcher_.attached() && (phase_ == nvinfer1::TensorRTPhase::kBUILD || launcher_.deferred()))
                error = launcher_.attach();
            Tensors tensors;
            for (int i = 0; i < fields_.nbInputs(); ++i) tensors.inputs[i] = reinterpret_cast<uint64_t>(inputs[i]);
            tensors.output = reinterpret_cast<uint64_t>(outputs[0]);
            tensors.workspace = reinterpret_cast<uint64_t>(workspace);
            // cudaStream_t and CUstream name the same driver object.
            if (error.empty())
                error = launcher_.launch(fields_.problem(inputDesc[0].dims.d[0], dtype), tensors,
                                         reinterpret_cast<CUstream>(stream));
            if (!error.empty()) {
                reportError(error, recorder_);
                return -1;
            }
            return 0;
        } catch (...) {
            reportError("MixtralMoE: enqueue failed (out of host memory)", recorder_);
            return -1;
        }
    }

    // One copy per execution context: it loads (or shares) that context's kernels here, before any
    // enqueue, so enqueue works inside CUDA graph capture. TensorRT creates execution contexts on a
    // thread with its CUDA context current; should none be, the first enqueue loads them.
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override {
        try {
            std::unique_ptr<MixtralMoEPlugin> attached(new MixtralMoEPlugin(*this));
            attached->recorder_ = context ? context->getErrorRecorder() : nullptr;
            if (std::string error = attached->launcher_.attach(/*later_without_context=*/true); !error.empty()) {
                reportError(error, attached->recorder_);
                return nullptr;
            }
            return attached.release();
        } catch (...) {
            return nullptr;
        }
    }

    const PluginFieldCollection* getFieldsToSerialize() noexcept override { return &collection_; }

private:
    Fields fields_;
    nvinfer1::TensorRTPhase phase_;
    std::array<PluginField, kNumFields> serialized_;
    PluginFieldCollection collection_{};
    KernelLauncher launcher_;
    nvinfer1::IErrorRecorder* recorder_ = nullptr;  // the execution context's, once attached
};

class MixtralMoECreator final : public nvinfer1::IPluginCreatorV3One {
public:
    MixtralMoECreator() {
        for (int i = 0; i < kNumFields; ++i)
            fieldNames_[i] = PluginField(kFieldNames[i], nullptr, PluginFieldType::kINT32, 1);
        collection_.nbFields = kNumFields;
        collection_.fields = fieldNames_.data();
    }

    // Build phase: fields from the ONNX node; runtime: the fields getFieldsToSerialize wrote.
    nvinfer1::IPluginV3* createPlugin(const char* /*name*/, const PluginFieldCollection* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override {
        try {
            Fields fields;
            if (std::string error = parseFields(fc, &fields); !error.empty()) {
                reportError(error);
                return nullptr;
            }
            return new MixtralMoEPlugin(fields, phase);
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

MixtralMoECreator gCreator;

// Registers the creator when the library is loaded, under the contract's namespace (TensorRT's
// REGISTER_TENSORRT_PLUGIN would register it under "", where the ONNX parser does not look), and
// withdraws it when the library is unloaded, so the registry never points into an unloaded library.
class LoadTimeRegistration {
public:
    LoadTimeRegistration() {
        if (!sameMajorVersion()) {
            reportError(versionMismatch());
            return;
        }
        registry_ = getPluginRegistry();
        if (registry_ && !registry_->registerCreator(gCreator, kPluginNamespace)) {
            registry_ = nullptr;
            reportError(std::string("MixtralMoE: registering ") + kPluginNamespace + "::" + kPluginName +
                        " failed (is another copy of the plugin library loaded?)");
        }
    }
    ~LoadTimeRegistration() { withdraw(); }
    LoadTimeRegistration(const LoadTimeRegistration&) = delete;
    LoadTimeRegistration& operator=(const LoadTimeRegistration&) = delete;

    void withdraw() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (registry_) registry_->deregisterCreator(gCreator);
        registry_ = nullptr;
    }

private:
    std::mutex mutex_;
    nvinfer1::IPluginRegistry* registry_ = nullptr;
};

// After gCreator (same translation unit: constructed after it, destroyed before it).
LoadTimeRegistration gLoadTimeRegistration;

}  // namespace
}  // namespace moe
}  // namespace mixexport

// Entry points of IPluginRegistry::loadLibrary (the names and signatures TensorRT looks up).
extern "C" {

MIXEXPORT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    std::lock_guard<std::mutex> lock(mixexport::moe::gLoggerMutex);
    mixexport::moe::gLoggerFinder = finder;
}

MIXEXPORT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    using namespace mixexport::moe;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&gCreator};
    if (!sameMajorVersion()) {
        reportError(versionMismatch());
        nbCreators = 0;
        return nullptr;
    }
    // loadLibrary registers these itself (and refuses creators that are registered already).
    gLoadTimeRegistration.withdraw();
    nbCreators = 1;
    return creators;
}

}  // extern "C"
