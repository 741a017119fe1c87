/* Prints the draws personalization makes, for tests/firmware/test_firmware.py
 * to compare with NumPy's: SEED then uniform, integers and permutation. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "../src/et_internal.h"

int main(int argc, char **argv) {
    et_rng rng;
    uint32_t perm[37], i;
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 10) : 0;
    et_rng_seed(&rng, seed);
    for (i = 0; i < 5; i++) printf("%.17g\n", et_rng_uniform(&rng, -6.0, 6.0));
    for (i = 0; i < 7; i++) printf("%" PRIu32 "\n", et_rng_bounded(&rng, 299));
    et_rng_permutation(&rng, perm, 37);
    for (i = 0; i < 37; i++) printf("%" PRIu32 "\n", perm[i]);
    for (i = 0; i < 5; i++) printf("%" PRIu32 "\n", et_rng_bounded(&rng, 0x7FFFFFFFu));
    for (i = 0; i < 3; i++) printf("%.17g\n", et_rng_uniform(&rng, 0.95, 1.05));
    return 0;
}
