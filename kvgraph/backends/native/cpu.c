/* Which build of kernels.c this CPU runs: 2 AVX-512 (F, BW, VL, VNNI), 1 AVX2 (+ FMA, F16C), 0 neither.
 * Compiled with no instruction-set flags, so it runs anywhere; __builtin_cpu_supports also checks that the
 * operating system saves the vector registers (XCR0), so a feature the CPU has but may not use reads 0. */
int kvg_cpu_level(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    return avx2 ? (avx512 ? 2 : 1) : 0;
#else
    return 0;
#endif
}
