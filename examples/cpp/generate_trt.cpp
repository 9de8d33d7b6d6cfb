// Greedy generation with a mixexport TensorRT engine: prefill on optimization profile 0 ("context", P = 0),
// then one token per step on profile 1 ("generation", S = 1), feeding present.{i}.* back as past_key_values.{i}.*.
//
//   generate_trt ENGINE PLUGIN_LIBRARY TOKEN_IDS [MAX_NEW_TOKENS]
//   generate_trt OUT/trt/model.engine build/plugins/moe/libmixexport_plugins.so 1,415,2936 16
//
// Everything model-specific comes from the engine: layers from the past_key_values.{i}.key inputs, KV heads, head
// dim and KV dtype from their shapes and types, the maximum context from profile 1's attention_mask bound. Batch 1.
// The plugin library must be loaded before deserializing: the engine refers to MixtralMoE by name only.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using nvinfer1::DataType;
using nvinfer1::Dims;

constexpr int32_t kContextProfile = 0;     // batch 1..B, sequence 1..S, past 0..0
constexpr int32_t kGenerationProfile = 1;  // sequence 1..1, past 1..max_context-1

class Logger final : public nvinfer1::ILogger {
    void log(Severity severity, char const* msg) noexcept override {
        if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
    }
};

void check(cudaError_t status, char const* what) {
    if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

void check(bool ok, std::string const& what) {
    if (!ok) throw std::runtime_error(what);
}

Dims dims(std::initializer_list<int64_t> extents) {
    Dims d{};
    d.nbDims = static_cast<int32_t>(extents.size());
    int32_t i = 0;
    for (int64_t e : extents) d.d[i++] = e;
    return d;
}

size_t elementBytes(DataType type) {
    switch (type) {
        case DataType::kFLOAT: return 4;
        case DataType::kHALF:
        case DataType::kBF16: return 2;
        case DataType::kINT64: return 8;
        case DataType::kINT32: return 4;
        default: throw std::runtime_error("unsupported tensor dtype in the engine");
    }
}

// Host value of one logits element (fp32, fp16 or bf16 bits).
float toFloat(unsigned char const* p, DataType type) {
    if (type == DataType::kFLOAT) {
        float f;
        std::memcpy(&f, p, 4);
        return f;
    }
    uint16_t h;
    std::memcpy(&h, p, 2);
    uint32_t bits;
    if (type == DataType::kBF16) {
        bits = static_cast<uint32_t>(h) << 16;
    } else {  // IEEE half -> float
        uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
        if (exp == 0) {
            if (mant == 0) {
                bits = sign;
            } else {  // subnormal: normalize
                exp = 127 - 15 + 1;
                while (!(mant & 0x400u)) { mant <<= 1; --exp; }
                bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
            }
        } else if (exp == 0x1f) {
            bits = sign | 0x7f800000u | (mant << 13);
        } else {
            bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
        }
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

struct DeviceBuffer {
    void* ptr = nullptr;
    explicit DeviceBuffer(size_t bytes) { check(cudaMalloc(&ptr, bytes < 256 ? 256 : bytes), "cudaMalloc"); }
    ~DeviceBuffer() { cudaFree(ptr); }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
};

std::vector<int64_t> parseTokens(char const* text) {
    std::vector<int64_t> tokens;
    std::stringstream stream(text);
    for (std::string item; std::getline(stream, item, ',');) {
        size_t used = 0;
        try {
            tokens.push_back(std::stoll(item, &used));
        } catch (std::logic_error const&) {
            used = 0;
        }
        check(used > 0 && used == item.size(), "TOKEN_IDS: '" + item + "' is not a token id");
    }
    check(!tokens.empty(), "TOKEN_IDS must be a comma-separated list of token ids, e.g. 1,415,2936");
    return tokens;
}

int run(int argc, char** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s ENGINE PLUGIN_LIBRARY TOKEN_IDS [MAX_NEW_TOKENS]\n", argv[0]);
        return 2;
    }
    std::vector<int64_t> tokens = parseTokens(argv[3]);
    int const maxNewTokens = argc > 4 ? std::atoi(argv[4]) : 16;
    check(maxNewTokens >= 0, "MAX_NEW_TOKENS must be a non-negative number");

    // Both files first, so a wrong path is named before any library is loaded.
    std::ifstream file(argv[1], std::ios::binary);
    check(file.good(), std::string("cannot read the engine ") + argv[1]);
    check(std::ifstream(argv[2]).good(), std::string("cannot read the plugin library ") + argv[2]);

    // Registers the MixtralMoE creator under its namespace (a static initializer of the library).
    // dlerror() only after dlopen has failed: it is null otherwise.
    if (dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
        char const* why = dlerror();
        throw std::runtime_error(std::string("cannot load ") + argv[2] + ": " + (why ? why : "unknown error"));
    }
    std::vector<char> blob((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());

    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
    check(runtime != nullptr, "createInferRuntime failed");
    std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(blob.data(), blob.size()));
    check(engine != nullptr, std::string("cannot deserialize ") + argv[1] + " (built by another TensorRT version?)");
    check(engine->getNbOptimizationProfiles() >= 2, "the engine needs the context (0) and generation (1) profiles");

    // Shapes from the engine: past [B, KVH, P, D], logits [B, S, V] (-1 where dynamic).
    int32_t layers = 0;
    for (int32_t i = 0; i < engine->getNbIOTensors(); ++i)
        if (std::strstr(engine->getIOTensorName(i), ".key") && std::strncmp(engine->getIOTensorName(i), "past_key_values.", 16) == 0)
            ++layers;
    check(layers > 0, "the engine has no past_key_values.{i}.key inputs");
    Dims const past = engine->getTensorShape("past_key_values.0.key");
    int64_t const kvHeads = past.d[1], headDim = past.d[3];
    int64_t const vocab = engine->getTensorShape("logits").d[2];
    DataType const kvType = engine->getTensorDataType("past_key_values.0.key");
    DataType const logitsType = engine->getTensorDataType("logits");
    int64_t const maxContext =
        engine->getProfileShape("attention_mask", kGenerationProfile, nvinfer1::OptProfileSelector::kMAX).d[1];
    int64_t const maxPrompt =
        engine->getProfileShape("input_ids", kContextProfile, nvinfer1::OptProfileSelector::kMAX).d[1];
    check(static_cast<int64_t>(tokens.size()) <= maxPrompt,
          "the prompt has " + std::to_string(tokens.size()) + " tokens; profile 0 accepts at most " + std::to_string(maxPrompt));
    int64_t const total = std::min<int64_t>(maxContext, static_cast<int64_t>(tokens.size()) + maxNewTokens);
    std::printf("engine: %d layers, %lld KV heads x %lld, vocab %lld, max context %lld\n", layers,
                static_cast<long long>(kvHeads), static_cast<long long>(headDim), static_cast<long long>(vocab),
                static_cast<long long>(maxContext));

    cudaStream_t stream;
    check(cudaStreamCreate(&stream), "cudaStreamCreate");
    std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
    check(context != nullptr, "createExecutionContext failed");

    // Two KV buffers per tensor, each large enough for the whole context: step t reads one, writes the other.
    size_t const kvBytes = static_cast<size_t>(kvHeads * total * headDim) * elementBytes(kvType);
    std::vector<std::unique_ptr<DeviceBuffer>> kv[2];
    for (auto& side : kv)
        for (int32_t i = 0; i < 2 * layers; ++i) side.push_back(std::make_unique<DeviceBuffer>(kvBytes));
    size_t const prompt = tokens.size();
    DeviceBuffer ids(prompt * 8), mask(total * 8), positions(prompt * 8);
    DeviceBuffer logits(prompt * vocab * elementBytes(logitsType));
    std::vector<int64_t> ones(total, 1), pos(prompt);
    check(cudaMemcpyAsync(mask.ptr, ones.data(), total * 8, cudaMemcpyHostToDevice, stream), "copy attention_mask");
    std::vector<unsigned char> lastRow(vocab * elementBytes(logitsType));

    int64_t pastLength = 0;
    int side = 0;
    while (static_cast<int64_t>(tokens.size()) < total) {
        bool const prefill = pastLength == 0;
        int64_t const step = prefill ? static_cast<int64_t>(prompt) : 1;
        if (prefill || pastLength == static_cast<int64_t>(prompt))  // profile changes once, before the first decode
            check(context->setOptimizationProfileAsync(prefill ? kContextProfile : kGenerationProfile, stream),
                  "setOptimizationProfileAsync failed");
        for (int64_t s = 0; s < step; ++s) pos[s] = pastLength + s;
        check(cudaMemcpyAsync(ids.ptr, tokens.data() + pastLength, step * 8, cudaMemcpyHostToDevice, stream), "copy input_ids");
        check(cudaMemcpyAsync(positions.ptr, pos.data(), step * 8, cudaMemcpyHostToDevice, stream), "copy position_ids");

        bool ok = context->setInputShape("input_ids", dims({1, step})) &&
                  context->setInputShape("attention_mask", dims({1, pastLength + step})) &&
                  context->setInputShape("position_ids", dims({1, step})) &&
                  context->setTensorAddress("input_ids", ids.ptr) && context->setTensorAddress("attention_mask", mask.ptr) &&
                  context->setTensorAddress("position_ids", positions.ptr) && context->setTensorAddress("logits", logits.ptr);
        for (int32_t layer = 0; ok && layer < layers; ++layer) {
            char const* kinds[2] = {"key", "value"};
            for (int k = 0; ok && k < 2; ++k) {
                std::string const in = "past_key_values." + std::to_string(layer) + "." + kinds[k];
                std::string const out = "present." + std::to_string(layer) + "." + kinds[k];
                ok = context->setInputShape(in.c_str(), dims({1, kvHeads, pastLength, headDim})) &&
                     context->setTensorAddress(in.c_str(), kv[side][2 * layer + k]->ptr) &&
                     context->setTensorAddress(out.c_str(), kv[1 - side][2 * layer + k]->ptr);
            }
        }
        check(ok, "binding the inputs failed (shapes outside the engine's profiles?)");
        check(context->enqueueV3(stream), "enqueueV3 failed");

        // Greedy: argmax over the last position's logits.
        size_t const rowBytes = lastRow.size();
        check(cudaMemcpyAsync(lastRow.data(), static_cast<unsigned char*>(logits.ptr) + (step - 1) * rowBytes, rowBytes,
                              cudaMemcpyDeviceToHost, stream),
              "copy logits");
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        int64_t best = 0;
        float bestValue = toFloat(lastRow.data(), logitsType);
        for (int64_t v = 1; v < vocab; ++v) {
            float const value = toFloat(lastRow.data() + v * elementBytes(logitsType), logitsType);
            if (value > bestValue) { bestValue = value; best = v; }
        }
        tokens.push_back(best);
        pastLength += step;
        side = 1 - side;  // present becomes past
    }

    std::printf("tokens:");
    for (int64_t t : tokens) std::printf(" %lld", static_cast<long long>(t));
    std::printf("\n");
    cudaStreamDestroy(stream);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (std::exception const& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
