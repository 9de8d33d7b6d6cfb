// The launcher without a GPU: a missing driver library is reported by name, nothing crashes, and
// an empty plan (N = 0) launches nothing without touching the driver.
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

    Plan empty;
    CHECK_EQ(makePlanFor(Problem{0, 4096, 14336, 8, 2, true, kBuiltDTypes[0]}, kBuiltArchs[0], Tile::kSmallM, true,
                         &empty), std::string());
    KernelLauncher launcher;
    CHECK_EQ(launcher.launch(empty, Tensors{}, nullptr), std::string());

    const bool have_driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD) || dlopen("libcuda.so.1", RTLD_NOW);
    if (!have_driver) {
        Plan plan;
        CHECK_EQ(makePlanFor(Problem{4, 4096, 14336, 8, 2, true, kBuiltDTypes[0]}, kBuiltArchs[0], Tile::kSmallM, true,
                             &plan), std::string());
        const std::string launched = launcher.launch(plan, Tensors{}, nullptr);
        CHECK_CONTAINS(launched, "libcuda.so.1");
        Device device;
        CHECK_CONTAINS(launcher.currentDevice(&device), "cannot load the CUDA driver library");
    }
    return finish("test_moe_launcher");
}
