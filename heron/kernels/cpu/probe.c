/*
 * Prints the CPU features heron's kernel variants need, one name per line, as the CPU and the
 * operating system report them (CPUID, and XGETBV for the register state the OS saves: a CPU
 * with AVX-512 under an OS that does not save ZMM registers must not run AVX-512 code).
 * Built with no target flags by heron/kernels/cpu/isa.py; works wherever <cpuid.h> does
 * (GCC and Clang on x86, Linux and macOS). On other architectures it prints the architecture.
 */
#include <stdio.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static unsigned long long xcr0(void) {
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

#define BIT(reg, n) (((reg) >> (n)) & 1u)

int main(void) {
    unsigned int a, b, c, d, max_leaf = __get_cpuid_max(0, 0);
    printf("x86\n");
    if (max_leaf < 1 || !__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int osxsave = BIT(c, 27);
    const unsigned long long state = osxsave ? xcr0() : 0;
    const int avx_state = (state & 0x6) == 0x6;          /* SSE and AVX registers saved */
    const int avx512_state = avx_state && (state & 0xE0) == 0xE0;  /* opmask, ZMM 0-31 */
    if (BIT(c, 19)) printf("sse4_1\n");
    if (avx_state && BIT(c, 28)) printf("avx\n");
    if (avx_state && BIT(c, 12)) printf("fma\n");
    if (avx_state && BIT(c, 29)) printf("f16c\n");
    if (max_leaf < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned int max_sub = a, ebx7 = b, ecx7 = c;
    if (avx_state && BIT(ebx7, 5)) printf("avx2\n");
    if (BIT(ebx7, 8)) printf("bmi2\n");
    if (avx_state && max_sub >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        if (BIT(a, 4)) printf("avx_vnni\n");  /* VEX-encoded VPDPBUSD on ymm (Alder Lake, Zen 5) */
    }
    if (avx512_state) {
        if (BIT(ebx7, 16)) printf("avx512f\n");
        if (BIT(ebx7, 17)) printf("avx512dq\n");
        if (BIT(ebx7, 30)) printf("avx512bw\n");
        if (BIT(ebx7, 31)) printf("avx512vl\n");
        if (BIT(ecx7, 11)) printf("avx512_vnni\n");
        if (max_sub >= 1) {
            __cpuid_count(7, 1, a, b, c, d);
            if (BIT(a, 5)) printf("avx512_bf16\n");
        }
    }
    return 0;
}
#else
int main(void) {
#if defined(__aarch64__)
    printf("aarch64\n");
#else
    printf("other\n");
#endif
    return 0;
}
#endif
