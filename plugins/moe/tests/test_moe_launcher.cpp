// The launcher without a GPU: a missing driver library is reported by name, nothing crashes, and
// an empty problem (N = 0) launches nothing without touching the driver. (With a driver, the
// plugin's interface test, test_trt_plugin, drives the launcher through a stand-in libcuda.so.1.)
#include <dlfcn.h>

#include "moe_kernels_generated.h"
#include "moe_launcher.h"
#include "test_harness.h"

using namespace mixexport::moe;

int main() {
    std::string error;
    CHECK(DriverApi::load(&error, "libmixexport-no-such-driver.so.1") == nullptr);
    CHECK_CONTAINS(error, "libmixexport-no-such-driver.so.1");
    CHECK_CONTAINS(error, "NVIDIA driver");
    std::shared_ptr<const ContextKernels> kernels;
    bool no_context = true;
    CHECK_CONTAINS(acquireKernels(&kernels, &no_context, "libmixexport-no-such-driver.so.1"),
                   "cannot load the CUDA driver library");
    CHECK(!no_context);  // no driver is an error even where a missing context would be deferred
    CHECK(kernels == nullptr);

    KernelLauncher launcher;
    CHECK(!launcher.attached());
    CHECK_EQ(launcher.launch(Problem{0, 4096, 14336, 8, 2, true, kBuiltDTypes[0]}, Tensors{}, nullptr), std::string());
    // Not attached: refused, never loaded lazily (enqueue may run under CUDA graph capture).
    CHECK_CONTAINS(launcher.launch(Problem{4, 4096, 14336, 8, 2, true, kBuiltDTypes[0]}, Tensors{}, nullptr),
                   "enqueue before the kernels were loaded");

    const bool have_driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD) || dlopen("libcuda.so.1", RTLD_NOW);
    if (!have_driver) {
        CHECK_CONTAINS(launcher.attach(), "libcuda.so.1");
        CHECK_CONTAINS(launcher.attach(/*later_without_context=*/true), "libcuda.so.1");
        CHECK(!launcher.attached() && !launcher.deferred());
    }
    return finish("test_moe_launcher");
}
