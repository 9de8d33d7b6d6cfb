// Stand-in for the part of libnvinfer a plugin library calls (getPluginRegistry, getLogger,
// getInferLibVersion), implemented against the real TensorRT headers the build was given
// (-DMIXEXPORT_TRT_HEADERS). It records what the plugin library registers and logs, so the
// interface test (test_trt_plugin.cpp) can check it. It builds no engine and runs no layer.
#pragma once

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace standin {

struct Registration {
    nvinfer1::IPluginCreatorInterface* creator;
    std::string name, version, ns;
    bool by_load_library;  // registered by loadLibrary from the library's getCreators
};

// What TensorRT's registry does with plugin creators, as far as a plugin library can observe it:
// registerCreator refuses a second creator with the same name, version and namespace; getCreator
// finds one by all three; loadLibrary dlopens a library, hands it a logger finder and registers
// what its getCreators returns under each creator's own namespace.
class RecordingRegistry final : public nvinfer1::IPluginRegistry {
public:
    std::vector<Registration> registrations;
    int deprecated_calls = 0;  // IPluginV2-era methods (TensorRT 10 only): a V3 library must not need them
    int resource_calls = 0;

    void setErrorRecorder(nvinfer1::IErrorRecorder* const recorder) noexcept override { recorder_ = recorder; }
    nvinfer1::IErrorRecorder* getErrorRecorder() const noexcept override { return recorder_; }
    bool isParentSearchEnabled() const override { return parent_search_; }
    void setParentSearchEnabled(bool const enabled) override { parent_search_ = enabled; }
    PluginLibraryHandle loadLibrary(nvinfer1::AsciiChar const* pluginPath) noexcept override;
    void deregisterLibrary(PluginLibraryHandle handle) noexcept override;
    bool registerCreator(nvinfer1::IPluginCreatorInterface& creator,
                         nvinfer1::AsciiChar const* const pluginNamespace) noexcept override;
    nvinfer1::IPluginCreatorInterface* const* getAllCreators(int32_t* const numCreators) const noexcept override;
    nvinfer1::IPluginCreatorInterface* getCreator(nvinfer1::AsciiChar const* const pluginName,
                                                  nvinfer1::AsciiChar const* const pluginVersion,
                                                  nvinfer1::AsciiChar const* const pluginNamespace = "") noexcept override;
    bool deregisterCreator(nvinfer1::IPluginCreatorInterface const& creator) noexcept override;
    nvinfer1::IPluginResource* acquirePluginResource(nvinfer1::AsciiChar const* key,
                                                     nvinfer1::IPluginResource* resource) noexcept override;
    int32_t releasePluginResource(nvinfer1::AsciiChar const* key) noexcept override;
    nvinfer1::IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const numCreators) noexcept override;
#if NV_TENSORRT_MAJOR < 11
// TensorRT 10's registry still has the IPluginV2 methods; the stand-in must define them to exist.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    bool registerCreator(nvinfer1::IPluginCreator& creator, nvinfer1::AsciiChar const* const ns) noexcept override;
    nvinfer1::IPluginCreator* const* getPluginCreatorList(int32_t* const numCreators) const noexcept override;
    nvinfer1::IPluginCreator* getPluginCreator(nvinfer1::AsciiChar const* const pluginName,
                                               nvinfer1::AsciiChar const* const pluginVersion,
                                               nvinfer1::AsciiChar const* const ns = "") noexcept override;
    bool deregisterCreator(nvinfer1::IPluginCreator const& creator) noexcept override;
#pragma GCC diagnostic pop
#endif

    // The logger finder loadLibrary hands to the library (tests point it at a logger of their own).
    nvinfer1::ILoggerFinder* logger_finder = nullptr;

private:
    struct Library {
        void* handle;
        std::vector<nvinfer1::IPluginCreatorInterface*> creators;
    };
    std::vector<Library> libraries_;
    mutable std::vector<nvinfer1::IPluginCreatorInterface*> listed_;
    nvinfer1::IErrorRecorder* recorder_ = nullptr;
    bool parent_search_ = true;
};

// A logger that keeps every message.
class RecordingLogger final : public nvinfer1::ILogger {
public:
    std::vector<std::string> messages;
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override;
};

// An error recorder that keeps every error (reference counting as TensorRT's contract asks).
class RecordingErrorRecorder final : public nvinfer1::IErrorRecorder {
public:
    std::vector<std::pair<nvinfer1::ErrorCode, std::string>> errors;
    int32_t getNbErrors() const noexcept override { return static_cast<int32_t>(errors.size()); }
    nvinfer1::ErrorCode getErrorCode(int32_t i) const noexcept override { return errors.at(i).first; }
    ErrorDesc getErrorDesc(int32_t i) const noexcept override { return errors.at(i).second.c_str(); }
    bool hasOverflowed() const noexcept override { return false; }
    void clear() noexcept override { errors.clear(); }
    bool reportError(nvinfer1::ErrorCode code, ErrorDesc desc) noexcept override;
    RefCount incRefCount() noexcept override { return ++refs_; }
    RefCount decRefCount() noexcept override { return --refs_; }

private:
    RefCount refs_ = 0;
};

// The process-wide objects behind getPluginRegistry() and getLogger().
RecordingRegistry& registry();
RecordingLogger& globalLogger();

}  // namespace standin
