#include "nvinfer_standin.h"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>

namespace standin {
namespace {

std::string creatorField(nvinfer1::IPluginCreatorInterface& creator, int which) {
    // A V3 creator says so in its interface info; only those have name/version/namespace getters here.
    if (std::strcmp(creator.getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) return {};
    auto& v3 = static_cast<nvinfer1::IPluginCreatorV3One&>(creator);
    const char* text = which == 0 ? v3.getPluginName() : which == 1 ? v3.getPluginVersion() : v3.getPluginNamespace();
    return text ? text : "";
}

bool add(RecordingRegistry& r, nvinfer1::IPluginCreatorInterface& creator, const std::string& ns, bool by_library) {
    const std::string name = creatorField(creator, 0), version = creatorField(creator, 1);
    if (name.empty()) return false;
    for (const Registration& reg : r.registrations)
        if (reg.name == name && reg.version == version && reg.ns == ns) return false;
    r.registrations.push_back(Registration{&creator, name, version, ns, by_library});
    return true;
}

}  // namespace

RecordingRegistry::PluginLibraryHandle RecordingRegistry::loadLibrary(nvinfer1::AsciiChar const* pluginPath) noexcept {
    void* handle = dlopen(pluginPath, RTLD_NOW | RTLD_LOCAL);
    if (!handle) return nullptr;
    using SetLoggerFinder = void (*)(nvinfer1::ILoggerFinder*);
    using GetCreators = nvinfer1::IPluginCreatorInterface* const* (*)(int32_t&);
    auto setFinder = reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder"));
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    if (!setFinder || !getCreators) {
        dlclose(handle);
        return nullptr;
    }
    setFinder(logger_finder);
    int32_t count = 0;
    nvinfer1::IPluginCreatorInterface* const* creators = getCreators(count);
    Library library{handle, {}};
    for (int32_t i = 0; creators && i < count; ++i) {
        if (!add(*this, *creators[i], creatorField(*creators[i], 2), true)) {
            for (auto* added : library.creators) deregisterCreator(*added);
            dlclose(handle);
            return nullptr;  // "fails if any of the plugins are already registered"
        }
        library.creators.push_back(creators[i]);
    }
    libraries_.push_back(library);
    return handle;
}

void RecordingRegistry::deregisterLibrary(PluginLibraryHandle handle) noexcept {
    for (auto it = libraries_.begin(); it != libraries_.end(); ++it) {
        if (it->handle != handle) continue;
        for (auto* creator : it->creators) deregisterCreator(*creator);
        dlclose(it->handle);
        libraries_.erase(it);
        return;
    }
}

bool RecordingRegistry::registerCreator(nvinfer1::IPluginCreatorInterface& creator,
                                        nvinfer1::AsciiChar const* const pluginNamespace) noexcept {
    return add(*this, creator, pluginNamespace ? pluginNamespace : "", false);
}

nvinfer1::IPluginCreatorInterface* const* RecordingRegistry::getAllCreators(int32_t* const numCreators) const noexcept {
    listed_.clear();
    for (const Registration& reg : registrations) listed_.push_back(reg.creator);
    *numCreators = static_cast<int32_t>(listed_.size());
    return listed_.empty() ? nullptr : listed_.data();
}

nvinfer1::IPluginCreatorInterface* RecordingRegistry::getCreator(nvinfer1::AsciiChar const* const pluginName,
                                                                 nvinfer1::AsciiChar const* const pluginVersion,
                                                                 nvinfer1::AsciiChar const* const pluginNamespace) noexcept {
    for (const Registration& reg : registrations)
        if (reg.name == pluginName && reg.version == pluginVersion && reg.ns == (pluginNamespace ? pluginNamespace : ""))
            return reg.creator;
    return nullptr;
}

bool RecordingRegistry::deregisterCreator(nvinfer1::IPluginCreatorInterface const& creator) noexcept {
    for (auto it = registrations.begin(); it != registrations.end(); ++it) {
        if (it->creator == &creator) {
            registrations.erase(it);
            return true;
        }
    }
    return false;
}

nvinfer1::IPluginResource* RecordingRegistry::acquirePluginResource(nvinfer1::AsciiChar const*,
                                                                    nvinfer1::IPluginResource*) noexcept {
    ++resource_calls;
    return nullptr;
}

int32_t RecordingRegistry::releasePluginResource(nvinfer1::AsciiChar const*) noexcept {
    ++resource_calls;
    return -1;
}

nvinfer1::IPluginCreatorInterface* const* RecordingRegistry::getAllCreatorsRecursive(int32_t* const numCreators) noexcept {
    return getAllCreators(numCreators);
}

#if NV_TENSORRT_MAJOR < 11
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
bool RecordingRegistry::registerCreator(nvinfer1::IPluginCreator&, nvinfer1::AsciiChar const* const) noexcept {
    ++deprecated_calls;
    return false;
}
nvinfer1::IPluginCreator* const* RecordingRegistry::getPluginCreatorList(int32_t* const numCreators) const noexcept {
    *numCreators = 0;
    return nullptr;
}
nvinfer1::IPluginCreator* RecordingRegistry::getPluginCreator(nvinfer1::AsciiChar const* const,
                                                              nvinfer1::AsciiChar const* const,
                                                              nvinfer1::AsciiChar const* const) noexcept {
    ++deprecated_calls;
    return nullptr;
}
bool RecordingRegistry::deregisterCreator(nvinfer1::IPluginCreator const&) noexcept {
    ++deprecated_calls;
    return false;
}
#pragma GCC diagnostic pop
#endif

void RecordingLogger::log(Severity, nvinfer1::AsciiChar const* msg) noexcept { messages.emplace_back(msg ? msg : ""); }

bool RecordingErrorRecorder::reportError(nvinfer1::ErrorCode code, ErrorDesc desc) noexcept {
    errors.emplace_back(code, desc ? desc : "");
    return false;  // false: TensorRT goes on (the error is not fatal to it)
}

RecordingRegistry& registry() {
    static RecordingRegistry instance;
    return instance;
}

RecordingLogger& globalLogger() {
    static RecordingLogger instance;
    return instance;
}

}  // namespace standin

// The libnvinfer entry points, with the headers' own declarations.
extern "C" {
nvinfer1::IPluginRegistry* getPluginRegistry() noexcept { return &standin::registry(); }
nvinfer1::ILogger* getLogger() noexcept { return &standin::globalLogger(); }
// There is no runtime to create here: the C++ example, linked to the stand-in, gets TensorRT's
// failure value and must say so (its tests check the messages before and at that point).
void* createInferRuntime_INTERNAL(void*, int32_t) noexcept { return nullptr; }
// MIXEXPORT_STANDIN_TRT_VERSION pretends to be another TensorRT (e.g. 110100 for 11.1.0).
int32_t getInferLibVersion() noexcept {
    const char* pretend = std::getenv("MIXEXPORT_STANDIN_TRT_VERSION");
    return pretend ? std::atoi(pretend) : NV_TENSORRT_VERSION;
}
}
