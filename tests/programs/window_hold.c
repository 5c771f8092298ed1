/* window_hold: map one MAP_VPAGETABLE window (vkrun then starts its agent
 * and resolver threads in this process), print "held PID", and exit once
 * stdin has a line or ends. For tests that look at vkrun's threads. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/mman.h>
#include "vkernel.h"

int main(void)
{
    struct vk_info info;
    if (vk_info(&info, sizeof(info))) {
        perror("vk_info");
        return 1;
    }
    void *w = vk_mmap(0, 16 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_VPAGETABLE,
                      info.ram_fd, 0);
    if (w == MAP_FAILED) {
        perror("vk_mmap");
        return 1;
    }
    printf("held %d\n", (int)getpid());
    fflush(stdout);
    char line[8];
    (void)!read(0, line, sizeof(line));
    return 0;
}
