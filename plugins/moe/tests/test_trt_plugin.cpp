// The plugin library driven the way TensorRT drives it, through the real IPluginV3 headers the
// build was given (-DMIXEXPORT_TRT_HEADERS). This program stands in for TensorRT: the plugin links
// the stand-in libnvinfer (standins/nvinfer_standin.cpp: a registry that records registrations, a
// logger), loads the stand-in libcuda.so.1 (standins/cuda_standin.cpp: books modules and launches),
// and is called here in TensorRT's order: registration -> creator fields -> createPlugin (build)
// -> getOutputShapes through an IExprBuilder -> supportsFormatCombination -> configurePlugin ->
// getWorkspaceSize -> enqueue -> getFieldsToSerialize -> createPlugin (runtime) -> attachToContext
// -> clone -> loadLibrary's entry points. No kernel runs and no engine is built: what this shows is
// that the library keeps TensorRT's interface contract, not that its numerics are right.
//
//   test_trt_plugin PLUGIN_LIBRARY NAME NAMESPACE VERSION            (name etc. from plugin_contract.json)
//   test_trt_plugin --version-mismatch PLUGIN_LIBRARY                 (as if run by another TensorRT major)
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cuda_standin.h"
#include "moe_kernels_generated.h"
#include "moe_plan.h"
#include "nvinfer_standin.h"
#include "test_harness.h"

namespace {

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;

// A small MoE the compiled kernels accept (H and I multiples of 16).
constexpr int64_t kH = 64, kI = 32, kE = 8, kK = 2;
const std::map<std::string, int64_t> kFieldValues = {
    {"top_k", kK}, {"normalize", 1}, {"num_experts", kE}, {"hidden_size", kH}, {"intermediate_size", kI},
    {"quant_bits", 0}, {"group_size", 0}};

// ---- TensorRT's side of the shape calculus -------------------------------------------------------

// An expression: a constant, or a symbol (a dimension TensorRT only knows at run time).
class Expr final : public nvinfer1::IDimensionExpr {
public:
    Expr(bool constant, int64_t value, std::string text) : text(std::move(text)), impl_(constant, value) {
        mImpl = &impl_;
    }
    ~Expr() noexcept override = default;
    const std::string text;

private:
    struct Impl final : nvinfer1::apiv::VDimensionExpr {
        Impl(bool c, int64_t v) : constant(c), value(v) {}
        bool isConstant() const override { return constant; }
        int64_t getConstantValue() const override { return constant ? value : -1; }
        bool isSizeTensor() const override { return false; }
        bool constant;
        int64_t value;
    } impl_;
};

class ExprBuilder final : public nvinfer1::IExprBuilder {
public:
    ExprBuilder() { mImpl = &impl_; }
    ~ExprBuilder() noexcept override = default;
    const Expr* symbol(const std::string& name) { return impl_.make(false, 0, name); }
    int operations() const { return impl_.operations; }

private:
    struct Impl final : nvinfer1::apiv::VExprBuilder {
        std::deque<std::unique_ptr<Expr>> exprs;
        int operations = 0;
        const Expr* make(bool constant, int64_t value, std::string text) {
            exprs.push_back(std::make_unique<Expr>(constant, value, std::move(text)));
            return exprs.back().get();
        }
        const nvinfer1::IDimensionExpr* constant(int64_t value) override {
            return make(true, value, std::to_string(value));
        }
        const nvinfer1::IDimensionExpr* operation(nvinfer1::DimensionOperation op, const nvinfer1::IDimensionExpr& a,
                                                  const nvinfer1::IDimensionExpr& b) override {
            ++operations;
            const std::string text = "(" + static_cast<const Expr&>(a).text + " op" + std::to_string(static_cast<int>(op)) +
                                     " " + static_cast<const Expr&>(b).text + ")";
            if (!a.isConstant() || !b.isConstant()) return make(false, 0, text);
            const int64_t x = a.getConstantValue(), y = b.getConstantValue();
            switch (op) {
                case nvinfer1::DimensionOperation::kSUM: return make(true, x + y, text);
                case nvinfer1::DimensionOperation::kPROD: return make(true, x * y, text);
                case nvinfer1::DimensionOperation::kMAX: return make(true, x > y ? x : y, text);
                case nvinfer1::DimensionOperation::kMIN: return make(true, x < y ? x : y, text);
                case nvinfer1::DimensionOperation::kSUB: return make(true, x - y, text);
                case nvinfer1::DimensionOperation::kEQUAL: return make(true, x == y, text);
                case nvinfer1::DimensionOperation::kLESS: return make(true, x < y, text);
                case nvinfer1::DimensionOperation::kFLOOR_DIV: return make(true, x / y, text);
                case nvinfer1::DimensionOperation::kCEIL_DIV: return make(true, (x + y - 1) / y, text);
            }
            return nullptr;
        }
        const nvinfer1::IDimensionExpr* declareSizeTensor(int32_t, const nvinfer1::IDimensionExpr&,
                                                          const nvinfer1::IDimensionExpr&) override {
            return nullptr;  // the plugin has no size-tensor outputs
        }
    } impl_;
};

class ResourceContext final : public nvinfer1::IPluginResourceContext {
public:
    standin::RecordingErrorRecorder recorder;
    nvinfer1::IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
    nvinfer1::IErrorRecorder* getErrorRecorder() const noexcept override {
        return const_cast<standin::RecordingErrorRecorder*>(&recorder);
    }
};

class LoggerFinder final : public nvinfer1::ILoggerFinder {
public:
    standin::RecordingLogger logger;
    nvinfer1::ILogger* findLogger() override { return &logger; }
};

// ---- helpers ---------------------------------------------------------------------------------------

bool lastMessageContains(const std::vector<std::string>& messages, const std::string& part) {
    return !messages.empty() && messages.back().find(part) != std::string::npos;
}

std::string lastMessage(const std::vector<std::string>& messages) { return messages.empty() ? "" : messages.back(); }

nvinfer1::Dims dims(std::initializer_list<int64_t> extents) {
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(extents.size());
    int i = 0;
    for (int64_t e : extents) d.d[i++] = e;
    return d;
}

// The fields a front end hands createPlugin: every name the creator lists, with our values.
struct FieldSet {
    std::vector<int32_t> i32;
    std::vector<int64_t> i64;
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};

    FieldSet(nvinfer1::IPluginCreatorV3One& creator, bool wide, const std::string& drop = "",
             const std::map<std::string, int64_t>& change = {}) {
        const PluginFieldCollection* names = creator.getFieldNames();
        i32.resize(names->nbFields);
        i64.resize(names->nbFields);
        for (int32_t f = 0; f < names->nbFields; ++f) {
            const std::string name = names->fields[f].name;
            CHECK(kFieldValues.count(name) == 1);
            if (name == drop || !kFieldValues.count(name)) continue;
            const int64_t value = change.count(name) ? change.at(name) : kFieldValues.at(name);
            i32[f] = static_cast<int32_t>(value);
            i64[f] = value;
            fields.emplace_back(names->fields[f].name, wide ? static_cast<void*>(&i64[f]) : static_cast<void*>(&i32[f]),
                                wide ? PluginFieldType::kINT64 : PluginFieldType::kINT32, 1);
        }
        collection.nbFields = static_cast<int32_t>(fields.size());
        collection.fields = fields.data();
    }
};

// A deep copy of getFieldsToSerialize, as TensorRT writes it into the engine and reads it back.
struct SerializedFields {
    std::vector<std::string> names;
    std::vector<std::vector<char>> data;
    std::vector<PluginField> fields;
    PluginFieldCollection collection{};

    explicit SerializedFields(const PluginFieldCollection& from) {
        for (int32_t i = 0; i < from.nbFields; ++i) {
            const PluginField& f = from.fields[i];
            CHECK(f.type == PluginFieldType::kINT32 && f.length == 1);
            names.emplace_back(f.name);
            const char* bytes = static_cast<const char*>(f.data);
            data.emplace_back(bytes, bytes + sizeof(int32_t) * f.length);
        }
        for (size_t i = 0; i < names.size(); ++i)
            fields.emplace_back(names[i].c_str(), data[i].data(), PluginFieldType::kINT32, 1);
        collection.nbFields = static_cast<int32_t>(fields.size());
        collection.fields = fields.data();
    }
};

DynamicPluginTensorDesc dynamicDesc(DataType type, std::initializer_list<int64_t> shape, int64_t min_n,
                                    int64_t max_n, bool first_is_n) {
    DynamicPluginTensorDesc desc{};
    desc.desc.type = type;
    desc.desc.format = nvinfer1::TensorFormat::kLINEAR;
    desc.desc.dims = dims(shape);
    desc.min = desc.max = desc.opt = desc.desc.dims;
    if (first_is_n) {
        desc.desc.dims.d[0] = -1;
        desc.min.d[0] = min_n;
        desc.max.d[0] = max_n;
        desc.opt.d[0] = max_n;
    }
    return desc;
}

std::array<DynamicPluginTensorDesc, 5> ioDescs(DataType type, int64_t max_n) {
    return {dynamicDesc(type, {-1, kH}, 1, max_n, true), dynamicDesc(type, {-1, kE}, 1, max_n, true),
            dynamicDesc(type, {kE, 2 * kI, kH}, 0, 0, false), dynamicDesc(type, {kE, kH, kI}, 0, 0, false),
            dynamicDesc(type, {-1, kH}, 1, max_n, true)};
}

struct Plugin {
    nvinfer1::IPluginV3* v3;
    nvinfer1::IPluginV3OneCore* core;
    nvinfer1::IPluginV3OneBuild* build;
    nvinfer1::IPluginV3OneRuntime* runtime;
};

Plugin capabilities(nvinfer1::IPluginV3* v3) {
    return Plugin{v3,
                  static_cast<nvinfer1::IPluginV3OneCore*>(v3->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE)),
                  static_cast<nvinfer1::IPluginV3OneBuild*>(v3->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD)),
                  static_cast<nvinfer1::IPluginV3OneRuntime*>(
                      v3->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME))};
}

int variantsFor(int arch) {
    int n = 0;
    for (const mixexport::moe::VariantSpec& v : mixexport::moe::kVariants) n += v.arch == arch;
    return n;
}

int enqueue(const Plugin& p, DataType type, int64_t n, void* stream) {
    nvinfer1::PluginTensorDesc in[4]{}, out[1]{};
    const nvinfer1::Dims shapes[4] = {dims({n, kH}), dims({n, kE}), dims({kE, 2 * kI, kH}), dims({kE, kH, kI})};
    for (int i = 0; i < 4; ++i) in[i] = nvinfer1::PluginTensorDesc{shapes[i], type, nvinfer1::TensorFormat::kLINEAR, 1.f};
    out[0] = in[0];
    // Device addresses as TensorRT's allocator gives them (256-byte aligned); nothing dereferences them.
    const void* inputs[4] = {reinterpret_cast<void*>(0x10000), reinterpret_cast<void*>(0x20000),
                             reinterpret_cast<void*>(0x30000), reinterpret_cast<void*>(0x40000)};
    void* outputs[1] = {reinterpret_cast<void*>(0x50000)};
    return p.runtime->enqueue(in, out, inputs, outputs, reinterpret_cast<void*>(0x100000),
                              static_cast<cudaStream_t>(stream));
}

// ---- the checks --------------------------------------------------------------------------------------

int versionMismatch(const char* library) {
    // The stand-in reports another major version from here on (it reads the variable on every call).
    setenv("MIXEXPORT_STANDIN_TRT_VERSION", NV_TENSORRT_MAJOR == 10 ? "110100" : "101600", 1);
    void* handle = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    CHECK(handle != nullptr);
    if (!handle) return finish("test_trt_plugin --version-mismatch");
    // Built for this header set, run against "another" TensorRT: nothing registered, nothing called.
    CHECK_EQ(standin::registry().registrations.size(), size_t{0});
    using GetCreators = nvinfer1::IPluginCreatorInterface* const* (*)(int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    CHECK(getCreators != nullptr);
    int32_t count = -1;
    if (getCreators) CHECK(getCreators(count) == nullptr);
    CHECK_EQ(count, 0);
    CHECK(standin::globalLogger().messages.empty());  // another major's logger is not called either
    dlclose(handle);
    return finish("test_trt_plugin --version-mismatch");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc == 3 && std::string(argv[1]) == "--version-mismatch") return versionMismatch(argv[2]);
    if (argc != 5) {
        std::fprintf(stderr, "usage: %s PLUGIN_LIBRARY NAME NAMESPACE VERSION\n", argv[0]);
        return 2;
    }
    const std::string library = argv[1], name = argv[2], ns = argv[3], version = argv[4];
    standin::RecordingRegistry& registry = standin::registry();
    std::vector<std::string>& log = standin::globalLogger().messages;

    // The stand-in driver, as the plugin will find it.
    void* cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    auto stateFn = cuda ? reinterpret_cast<standin::CudaState* (*)()>(dlsym(cuda, "mixexport_standin_cuda_state"))
                        : nullptr;
    CHECK(stateFn != nullptr);
    if (!stateFn) {
        std::fprintf(stderr, "libcuda.so.1 on LD_LIBRARY_PATH must be the stand-in (standins/cuda_standin.cpp)\n");
        return finish("test_trt_plugin");
    }
    standin::CudaState& gpu = *stateFn();

    // 1. Loading the library registers the creator under the contract's namespace, and only there.
    void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
    CHECK(handle != nullptr);
    if (!handle) {
        std::fprintf(stderr, "dlopen(%s): %s\n", library.c_str(), dlerror());
        return finish("test_trt_plugin");
    }
    CHECK_EQ(registry.registrations.size(), size_t{1});
    CHECK_EQ(registry.registrations.at(0).ns, ns);
    CHECK_EQ(registry.registrations.at(0).name, name);
    CHECK_EQ(registry.registrations.at(0).version, version);
    CHECK(!registry.registrations.at(0).by_load_library);
    CHECK(registry.getCreator(name.c_str(), version.c_str(), "") == nullptr);  // where REGISTER_TENSORRT_PLUGIN puts it
    auto* creator = dynamic_cast<nvinfer1::IPluginCreatorV3One*>(
        registry.getCreator(name.c_str(), version.c_str(), ns.c_str()));
    CHECK(creator != nullptr);
    if (!creator) return finish("test_trt_plugin");
    CHECK_EQ(std::string(creator->getPluginNamespace()), ns);
    CHECK(log.empty());

    // 2. Fields: every name the creator lists gets a value; bad field sets are refused with a message.
    CHECK_EQ(creator->getFieldNames()->nbFields, static_cast<int32_t>(kFieldValues.size()));
    {
        FieldSet missing(*creator, false, "num_experts");
        CHECK(creator->createPlugin("moe", &missing.collection, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
        CHECK(lastMessageContains(log, "missing field num_experts"));
        FieldSet huge(*creator, true, "", {{"hidden_size", int64_t{1} << 33}});
        CHECK(creator->createPlugin("moe", &huge.collection, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
        CHECK(lastMessageContains(log, "outside the int32 range"));
        FieldSet tooMany(*creator, false, "", {{"top_k", kE + 1}});
        CHECK(creator->createPlugin("moe", &tooMany.collection, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
        CHECK(lastMessageContains(log, "exceeds the 8 experts"));
        // An application's error recorder on the registry gets the errors instead of the logger.
        standin::RecordingErrorRecorder recorder;
        registry.setErrorRecorder(&recorder);
        FieldSet badNormalize(*creator, false, "", {{"normalize", 2}});
        const size_t logged = log.size();
        CHECK(creator->createPlugin("moe", &badNormalize.collection, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
        CHECK_EQ(recorder.errors.size(), size_t{1});
        CHECK(recorder.errors.size() == 1 && recorder.errors[0].second.find("normalize=2") != std::string::npos &&
              recorder.errors[0].first == nvinfer1::ErrorCode::kINVALID_ARGUMENT);
        CHECK_EQ(log.size(), logged);
        registry.setErrorRecorder(nullptr);
    }

    // 3. Build phase, from int64 fields (in range: accepted).
    FieldSet fields(*creator, true);
    nvinfer1::IPluginV3* built = creator->createPlugin("moe", &fields.collection, nvinfer1::TensorRTPhase::kBUILD);
    CHECK(built != nullptr);
    if (!built) return finish("test_trt_plugin");
    Plugin b = capabilities(built);
    CHECK(b.core && b.build && b.runtime);
    CHECK_EQ(std::string(b.core->getPluginName()), name);
    CHECK_EQ(std::string(b.core->getPluginNamespace()), ns);
    CHECK_EQ(std::string(b.core->getPluginVersion()), version);
    CHECK_EQ(b.build->getNbOutputs(), 1);
    const DataType types[4] = {DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF};
    DataType outType = DataType::kFLOAT;
    CHECK_EQ(b.build->getOutputDataTypes(&outType, 1, types, 4), 0);
    CHECK(outType == DataType::kHALF);

    // 4. Output shapes through TensorRT's expression calculus: y = [N, H] with H a constant.
    {
        ExprBuilder exprs;
        const nvinfer1::IDimensionExpr* n = exprs.symbol("N");
        DimsExprs in[4]{};
        const nvinfer1::IDimensionExpr* hidden = exprs.constant(kH);
        in[0].nbDims = 2, in[0].d[0] = n, in[0].d[1] = exprs.symbol("H");  // x's width left symbolic
        in[1].nbDims = 2, in[1].d[0] = n, in[1].d[1] = exprs.constant(kE);
        in[2].nbDims = 3, in[2].d[0] = exprs.constant(kE), in[2].d[1] = exprs.constant(2 * kI), in[2].d[2] = hidden;
        in[3].nbDims = 3, in[3].d[0] = exprs.constant(kE), in[3].d[1] = hidden, in[3].d[2] = exprs.constant(kI);
        DimsExprs out[1]{};
        CHECK_EQ(b.build->getOutputShapes(in, 4, nullptr, 0, out, 1, exprs), 0);
        CHECK_EQ(out[0].nbDims, 2);
        CHECK(out[0].d[0] == n);
        CHECK(out[0].d[1] && out[0].d[1]->isConstant() && out[0].d[1]->getConstantValue() == kH);
        in[0].d[1] = exprs.constant(kH + 16);
        CHECK_EQ(b.build->getOutputShapes(in, 4, nullptr, 0, out, 1, exprs), -1);
        CHECK(lastMessageContains(log, "columns but hidden_size is 64"));
    }

    // 5. Formats: linear, one 16-bit dtype the kernels were built for, the same for every tensor.
    {
        auto io = ioDescs(DataType::kHALF, 256);
        const bool halfBuilt = mixexport::moe::checkProblem({1, kH, kI, kE, kK, true, mixexport::moe::DType::kFP16}).empty();
        for (int pos = 0; pos < 5; ++pos) CHECK(b.build->supportsFormatCombination(pos, io.data(), 4, 1) == halfBuilt);
        io[2].desc.type = DataType::kBF16;
        CHECK(!b.build->supportsFormatCombination(2, io.data(), 4, 1));
        io[0].desc.type = DataType::kINT8;
        CHECK(!b.build->supportsFormatCombination(0, io.data(), 4, 1));
        io = ioDescs(DataType::kHALF, 256);
        io[1].desc.format = nvinfer1::TensorFormat::kHWC8;
        CHECK(!b.build->supportsFormatCombination(1, io.data(), 4, 1));
        CHECK(!b.build->supportsFormatCombination(5, io.data(), 4, 1));
    }

    // 6. configurePlugin checks the shapes and loads the kernels of the builder's context (sm_90 here).
    const int perContext = variantsFor(90);
    CHECK(perContext > 0);
    {
        auto io = ioDescs(DataType::kHALF, 256);
        io[3].desc.dims.d[2] = kI + 16;
        CHECK_EQ(b.build->configurePlugin(io.data(), 4, io.data() + 4, 1), -1);
        CHECK(lastMessageContains(log, "input w_down has shape [8, 64, 48]"));
        CHECK_EQ(gpu.loaded, 0);
        io = ioDescs(DataType::kHALF, 256);
        CHECK_EQ(b.build->configurePlugin(io.data(), 4, io.data() + 4, 1), 0);
        CHECK_EQ(gpu.loaded, perContext);
        CHECK_EQ(gpu.cubins, perContext);
        CHECK(gpu.missing_functions.empty());

        // 7. Workspace: the bound over every arch and tile at the profile's largest N.
        size_t bound = 0;
        CHECK_EQ(mixexport::moe::workspaceBound({256, kH, kI, kE, kK, true, mixexport::moe::DType::kFP16}, &bound),
                 std::string());
        CHECK_EQ(b.build->getWorkspaceSize(io.data(), 4, io.data() + 4, 1), bound);
        auto small = ioDescs(DataType::kHALF, 4);
        CHECK(b.build->getWorkspaceSize(small.data(), 4, small.data() + 4, 1) < bound);
    }

    // 8. enqueue (the builder times the layer): six launches on TensorRT's stream, nothing loaded.
    {
        void* stream = reinterpret_cast<void*>(0x5151);
        CHECK_EQ(enqueue(b, DataType::kHALF, 7, stream), 0);
        CHECK_EQ(gpu.launches.size(), size_t{6});
        mixexport::moe::Plan plan;
        CHECK_EQ(mixexport::moe::makePlan({7, kH, kI, kE, kK, true, mixexport::moe::DType::kFP16},
                                          mixexport::moe::Device{90, gpu.shared_optin}, &plan),
                 std::string());
        for (size_t i = 0; i < gpu.launches.size() && i < 6; ++i) {
            CHECK_EQ(gpu.launches[i].function, std::string(plan.launches[i].variant->entry));
            CHECK_EQ(gpu.launches[i].grid[0], plan.launches[i].grid[0]);
            CHECK_EQ(gpu.launches[i].block, plan.launches[i].block);
            CHECK(gpu.launches[i].stream == stream);
        }
        CHECK_EQ(gpu.loaded, perContext);
        CHECK_EQ(enqueue(b, DataType::kHALF, 0, stream), 0);  // N = 0: nothing to launch
        CHECK_EQ(gpu.launches.size(), size_t{6});
        // A build-phase copy the builder never configured loads (here: shares) the kernels itself.
        nvinfer1::IPluginV3* unconfigured = creator->createPlugin("moe", &fields.collection,
                                                                  nvinfer1::TensorRTPhase::kBUILD);
        CHECK(unconfigured != nullptr);
        if (unconfigured) {
            CHECK_EQ(enqueue(capabilities(unconfigured), DataType::kHALF, 5, stream), 0);
            CHECK_EQ(gpu.launches.size(), size_t{12});
            CHECK_EQ(gpu.loaded, perContext);
            delete unconfigured;
            CHECK_EQ(gpu.unloaded, 0);  // `built` still holds them
        }
    }

    // 9. Serialize, destroy the build-phase plugin (its modules go with it), deserialize.
    SerializedFields serialized(*b.runtime->getFieldsToSerialize());
    CHECK_EQ(serialized.collection.nbFields, static_cast<int32_t>(kFieldValues.size()));
    delete built;
    CHECK_EQ(gpu.unloaded, perContext);
    nvinfer1::IPluginV3* loaded = creator->createPlugin("moe", &serialized.collection, nvinfer1::TensorRTPhase::kRUNTIME);
    CHECK(loaded != nullptr);
    if (!loaded) return finish("test_trt_plugin");
    Plugin r = capabilities(loaded);
    SerializedFields again(*r.runtime->getFieldsToSerialize());
    for (int32_t i = 0; i < serialized.collection.nbFields && i < again.collection.nbFields; ++i) {
        CHECK_EQ(again.names[i], serialized.names[i]);
        CHECK(again.data[i] == serialized.data[i]);
        CHECK_EQ(static_cast<int64_t>(*reinterpret_cast<const int32_t*>(again.data[i].data())),
                 kFieldValues.at(again.names[i]));
    }
    // A runtime copy that was never attached refuses to run instead of loading inside enqueue.
    CHECK_EQ(enqueue(r, DataType::kHALF, 3, nullptr), -1);
    CHECK(lastMessageContains(log, "enqueue before the kernels were loaded"));
    CHECK_EQ(gpu.loaded, perContext);

    // 10. attachToContext: one copy per execution context; copies in one CUDA context share modules.
    {
        ResourceContext ctxA, ctxB;
        nvinfer1::IPluginV3* a = r.runtime->attachToContext(&ctxA);
        CHECK(a != nullptr);
        CHECK_EQ(gpu.loaded, 2 * perContext);
        nvinfer1::IPluginV3* b2 = r.runtime->attachToContext(&ctxB);
        CHECK(b2 != nullptr);
        nvinfer1::IPluginV3* c = a ? a->clone() : nullptr;
        CHECK(c != nullptr);
        CHECK_EQ(gpu.loaded, 2 * perContext);  // shared, not reloaded
        if (a) {
            Plugin pa = capabilities(a);
            const nvinfer1::PluginTensorDesc in[4]{};
            CHECK_EQ(pa.runtime->onShapeChange(in, 4, in, 1), -1);  // rank-0 shapes: refused, through ctxA's recorder
            CHECK(!ctxA.recorder.errors.empty() &&
                  ctxA.recorder.errors.back().second.find("input x has shape") != std::string::npos);
            const size_t before = gpu.launches.size();
            CHECK_EQ(enqueue(pa, DataType::kHALF, 300, nullptr), 0);  // past the small_m rule: large_m tiles
            CHECK_EQ(gpu.launches.size(), before + 6);
        }
        // Another CUDA context loads its own set; enqueue must stay in the context it attached to.
        gpu.current_context = 0x2000;
        nvinfer1::IPluginV3* d = r.runtime->attachToContext(&ctxA);
        CHECK(d != nullptr);
        CHECK_EQ(gpu.loaded, 3 * perContext);
        if (c) {
            CHECK_EQ(enqueue(capabilities(c), DataType::kHALF, 3, nullptr), -1);
            CHECK(!ctxA.recorder.errors.empty() &&
                  ctxA.recorder.errors.back().second.find("another CUDA context") != std::string::npos);
        }
        delete d;
        CHECK_EQ(gpu.unloaded, 2 * perContext);
        gpu.current_context = 0x1000;
        delete a;
        delete b2;
        CHECK_EQ(gpu.unloaded, 2 * perContext);  // the clone still holds them
        delete c;
        CHECK_EQ(gpu.unloaded, 3 * perContext);
    }

    // 11. Failures while loading leave nothing loaded, and say why in the context's recorder.
    {
        ResourceContext ctx;
        gpu.fail_load_at = gpu.load_calls + 3;
        CHECK(r.runtime->attachToContext(&ctx) == nullptr);
        CHECK(!ctx.recorder.errors.empty() &&
              ctx.recorder.errors.back().second.find("failed: device kernel image is invalid") != std::string::npos);
        CHECK_EQ(gpu.loaded, gpu.unloaded);
        gpu.fail_load_at = -1;
        // A driver older than the cubins' CUDA release: one line saying which driver is needed.
        const int driver = gpu.driver_version;
        gpu.driver_version = 12080;
        CHECK(r.runtime->attachToContext(&ctx) == nullptr);
        const std::string said = ctx.recorder.errors.empty() ? "" : ctx.recorder.errors.back().second;
        int needed = 0;
        for (const mixexport::moe::VariantSpec& v : mixexport::moe::kVariants)
            if (v.arch == 90 && v.cuda_for_cubin > needed) needed = v.cuda_for_cubin;
        if (needed > 12080) {
            CHECK_CONTAINS(said, "need a driver for CUDA");
            CHECK_CONTAINS(said, "this one supports CUDA 12.8");
        }
        gpu.driver_version = driver;
        // A GPU without a build of its own runs the newest older arch's PTX, if that PTX is portable.
        gpu.cc_major = 8, gpu.cc_minor = 7;
        nvinfer1::IPluginV3* jit = r.runtime->attachToContext(&ctx);
        CHECK_EQ(jit != nullptr, variantsFor(86) > 0);
        CHECK(jit == nullptr || gpu.ptx == variantsFor(86));
        delete jit;
        gpu.cc_major = 9, gpu.cc_minor = 0;
        // No current context at attach: the copy is made, and its first enqueue loads the kernels.
        gpu.current_context = 0;
        const int loadedBefore = gpu.loaded;
        nvinfer1::IPluginV3* later = r.runtime->attachToContext(&ctx);
        CHECK(later != nullptr);
        CHECK_EQ(gpu.loaded, loadedBefore);
        if (later) {
            CHECK_EQ(enqueue(capabilities(later), DataType::kHALF, 3, nullptr), -1);  // still none
            CHECK(!ctx.recorder.errors.empty() &&
                  ctx.recorder.errors.back().second.find("no current CUDA context") != std::string::npos);
            gpu.current_context = 0x1000;
            CHECK_EQ(enqueue(capabilities(later), DataType::kHALF, 3, nullptr), 0);
            CHECK_EQ(gpu.loaded, loadedBefore + perContext);
            delete later;
        }
        gpu.current_context = 0x1000;
        CHECK_EQ(gpu.loaded, gpu.unloaded);
    }

    // 11b. Quantized experts (quant_bits 8): uint8 weights and two scale inputs in x's dtype, dispatched
    // to the int8 GEMM variants where the AOT build has them (-DMIXEXPORT_KERNEL_QUANT), refused
    // with the rebuild hint where it does not. A 16-bit node may leave both fields out.
    {
        FieldSet absent(*creator, false, "quant_bits");
        nvinfer1::IPluginV3* plain = creator->createPlugin("moe", &absent.collection, nvinfer1::TensorRTPhase::kBUILD);
        CHECK(plain != nullptr);
        delete plain;
        FieldSet three(*creator, false, "", {{"quant_bits", 3}});
        CHECK(creator->createPlugin("moe", &three.collection, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
        CHECK(lastMessageContains(log, "quant_bits=3 must be 0, 8 or 4"));
        const mixexport::moe::Problem int8{7, kH, kI, kE, kK, true, mixexport::moe::DType::kFP16, 8, 0};
        const bool int8Built = mixexport::moe::checkProblem(int8).empty();
        FieldSet quantized(*creator, false, "", {{"quant_bits", 8}});
        nvinfer1::IPluginV3* q = creator->createPlugin("moe", &quantized.collection, nvinfer1::TensorRTPhase::kBUILD);
        CHECK_EQ(q != nullptr, int8Built);
        if (!int8Built) CHECK(lastMessageContains(log, "no GEMM kernels were built for int8 expert weights"));
        if (q) {
            Plugin pq = capabilities(q);
            const DataType types[6] = {DataType::kHALF, DataType::kHALF, DataType::kUINT8, DataType::kUINT8,
                                       DataType::kHALF, DataType::kHALF};
            DataType outType = DataType::kFLOAT;
            CHECK_EQ(pq.build->getOutputDataTypes(&outType, 1, types, 6), 0);
            CHECK(outType == DataType::kHALF);
            CHECK_EQ(pq.build->getOutputDataTypes(&outType, 1, types, 4), -1);
            const int64_t n = 256;
            std::array<DynamicPluginTensorDesc, 7> io = {
                dynamicDesc(DataType::kHALF, {-1, kH}, 1, n, true), dynamicDesc(DataType::kHALF, {-1, kE}, 1, n, true),
                dynamicDesc(DataType::kUINT8, {kE, 2 * kI, kH}, 0, 0, false),
                dynamicDesc(DataType::kUINT8, {kE, kH, kI}, 0, 0, false),
                dynamicDesc(DataType::kHALF, {kE, 2 * kI, 1}, 0, 0, false),
                dynamicDesc(DataType::kHALF, {kE, kH, 1}, 0, 0, false), dynamicDesc(DataType::kHALF, {-1, kH}, 1, n, true)};
            for (int pos = 0; pos < 7; ++pos) CHECK(pq.build->supportsFormatCombination(pos, io.data(), 6, 1));
            CHECK(!pq.build->supportsFormatCombination(0, io.data(), 4, 1));
            io[2].desc.type = DataType::kHALF;
            CHECK(!pq.build->supportsFormatCombination(2, io.data(), 6, 1));  // weights must be bytes
            io[2].desc.type = DataType::kUINT8;
            io[4].desc.type = DataType::kUINT8;
            CHECK(!pq.build->supportsFormatCombination(4, io.data(), 6, 1));  // scales are in x's dtype
            io[4].desc.type = DataType::kHALF;
            io[5].desc.dims.d[2] = 2;
            CHECK_EQ(pq.build->configurePlugin(io.data(), 6, io.data() + 6, 1), -1);
            CHECK(lastMessageContains(log, "input s_down has shape [8, 64, 2]"));
            io[5].desc.dims.d[2] = 1;
            io[3].desc.type = DataType::kHALF;
            CHECK_EQ(pq.build->configurePlugin(io.data(), 6, io.data() + 6, 1), -1);
            CHECK(lastMessageContains(log, "input w_down must be uint8"));
            io[3].desc.type = DataType::kUINT8;
            CHECK_EQ(pq.build->configurePlugin(io.data(), 6, io.data() + 6, 1), 0);
            CHECK_EQ(pq.build->configurePlugin(io.data(), 4, io.data() + 6, 1), -1);
            // enqueue: six launches, the GEMMs the int8 variants, the scales bound after their weights.
            nvinfer1::PluginTensorDesc in[6]{}, out[1]{};
            for (int i = 0; i < 6; ++i) in[i] = io[i].desc;
            in[0].dims.d[0] = in[1].dims.d[0] = 7;
            out[0] = in[0];
            const void* inputs[6] = {reinterpret_cast<void*>(0x10000), reinterpret_cast<void*>(0x20000),
                                     reinterpret_cast<void*>(0x30000), reinterpret_cast<void*>(0x40000),
                                     reinterpret_cast<void*>(0x60000), reinterpret_cast<void*>(0x70000)};
            void* outputs[1] = {reinterpret_cast<void*>(0x50000)};
            const size_t before = gpu.launches.size();
            CHECK_EQ(pq.runtime->enqueue(in, out, inputs, outputs, reinterpret_cast<void*>(0x100000), nullptr), 0);
            CHECK_EQ(gpu.launches.size(), before + 6);
            mixexport::moe::Plan plan;
            CHECK_EQ(mixexport::moe::makePlan(int8, mixexport::moe::Device{90, gpu.shared_optin}, &plan), std::string());
            CHECK(plan.launches[3].variant->quant_bits == 8 && plan.launches[4].variant->quant_bits == 8);
            mixexport::moe::Tensors tensors;
            for (int i = 0; i < 6; ++i) tensors.inputs[i] = reinterpret_cast<uint64_t>(inputs[i]);
            mixexport::moe::KernelArgs args;
            CHECK_EQ(mixexport::moe::bindArgs(plan, 3, tensors, &args), std::string());
            bool scalesBound = false;
            for (int i = 0; i < args.count; ++i) scalesBound |= args.values[i].ptr == 0x60000;
            CHECK(scalesBound);
            for (size_t i = before; i < gpu.launches.size() && i - before < 6; ++i)
                CHECK_EQ(gpu.launches[i].function, std::string(plan.launches[i - before].variant->entry));
            delete q;
        }
        CHECK_EQ(gpu.loaded, gpu.unloaded);
    }
    delete loaded;

    // 12. Unloading the library withdraws its load-time registration (the registry keeps no pointer
    // into unloaded code).
    dlclose(handle);
    CHECK(registry.registrations.empty());

    // 13. IPluginRegistry::loadLibrary: the library hands its creator over (registered once, under
    // its namespace, by the library handle), logs through the finder, and leaves with the handle.
    {
        LoggerFinder finder;
        registry.logger_finder = &finder;
        nvinfer1::IPluginRegistry::PluginLibraryHandle lib = registry.loadLibrary(library.c_str());
        CHECK(lib != nullptr);
        CHECK_EQ(registry.registrations.size(), size_t{1});
        CHECK(!registry.registrations.empty() && registry.registrations[0].by_load_library &&
              registry.registrations[0].ns == ns);
        auto* again = dynamic_cast<nvinfer1::IPluginCreatorV3One*>(
            registry.getCreator(name.c_str(), version.c_str(), ns.c_str()));
        CHECK(again != nullptr);
        if (again) {
            FieldSet missing(*again, false, "top_k");
            CHECK(again->createPlugin("moe", &missing.collection, nvinfer1::TensorRTPhase::kBUILD) == nullptr);
            CHECK(lastMessageContains(finder.logger.messages, "missing field top_k"));
        }
        registry.deregisterLibrary(lib);
        CHECK(registry.registrations.empty());
        registry.logger_finder = nullptr;
    }
    CHECK_EQ(registry.deprecated_calls, 0);
    CHECK_EQ(registry.resource_calls, 0);
    CHECK_EQ(gpu.unload_errors, 0);
    if (test::failures) std::fprintf(stderr, "last plugin message: %s\n", lastMessage(log).c_str());
    dlclose(cuda);
    return finish("test_trt_plugin");
}
