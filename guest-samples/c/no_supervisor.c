/*
 * no_supervisor.c - call every vkernel.h wrapper without vkrun.
 *
 * Linux answers -ENOSYS to every hypercall number, so each wrapper must
 * return -1 (MAP_FAILED for the mmaps) with errno ENOSYS, and
 * vk_raw_hypercall must return -ENOSYS. Prints, one line each:
 *
 *   call <name> ret=<dec> errno=<dec>
 *   raw <name> <dec>
 *
 * for guest-samples/abi/tests/c_header.rs to check. Pointer arguments other
 * than vk_info's are made up: the kernel rejects the number before it looks
 * at them.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "vkernel.h"

#define ADDR(a) ((void *)(uintptr_t)(a))

static void report(const char *name, long ret)
{
    printf("call %s ret=%ld errno=%d\n", name, ret, errno);
    errno = 0;
}

static void raw(const char *name, uint64_t nr)
{
    printf("raw %s %ld\n", name, vk_raw_hypercall(nr, 0, 0, 0, 0, 0, 0));
}

int main(void)
{
    struct vk_info info;
    void *id = ADDR(0x1d00);
    void *p;

    memset(&info, 0xa5, sizeof info);
    errno = 0;
    report("vk_info", vk_info(&info, sizeof info));
    p = vk_mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_VPAGETABLE, 3, 0);
    report("vk_mmap", p == MAP_FAILED ? -1 : 0);
    report("mcontrol", mcontrol(ADDR(0x10000), 4096, MADV_INVAL, 0));
    report("vmspace_create", vmspace_create(id, 0, NULL));
    report("vmspace_destroy", vmspace_destroy(id));
    report("vmspace_ctl", vmspace_ctl(id, VMSPACE_CTL_RUN, (struct trapframe *)ADDR(0x7f00),
                                      (struct vextframe *)ADDR(0x7e00)));
    p = vmspace_mmap(id, NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    report("vmspace_mmap", p == MAP_FAILED ? -1 : 0);
    report("vmspace_munmap", vmspace_munmap(id, ADDR(0x10000), 4096));
    report("vmspace_mcontrol", vmspace_mcontrol(id, ADDR(0x10000), 4096, MADV_SETMAP, 0));
    report("vmspace_pread", (long)vmspace_pread(id, ADDR(0xb000), 16, 0, 0x10000));
    report("vmspace_pwrite", (long)vmspace_pwrite(id, ADDR(0xc000), 16, 0, 0x10000));

    raw("vk_info", VK_SYS_vk_info);
    raw("vk_mmap", VK_SYS_vk_mmap);
    raw("mcontrol", VK_SYS_mcontrol);
    raw("vmspace_create", VK_SYS_vmspace_create);
    raw("vmspace_destroy", VK_SYS_vmspace_destroy);
    raw("vmspace_ctl", VK_SYS_vmspace_ctl);
    raw("vmspace_mmap", VK_SYS_vmspace_mmap);
    raw("vmspace_munmap", VK_SYS_vmspace_munmap);
    raw("vmspace_mcontrol", VK_SYS_vmspace_mcontrol);
    raw("vmspace_pread", VK_SYS_vmspace_pread);
    raw("vmspace_pwrite", VK_SYS_vmspace_pwrite);

    /* vk_info failed, so it must not have written the buffer. */
    printf("vk_info_untouched %d\n", info.abi_version == 0xa5a5a5a5u ? 1 : 0);
    return fflush(stdout) == 0 ? 0 : 1;
}
