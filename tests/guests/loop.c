/* Writes 0, 1, 2, ... LOOP_COUNT-1 to port 0xe4, one exit each: a guest whose progress
 * the test can watch (pause, reset) and time (exit round trips). */
#include "lib.h"

#define LOOP_PORT 0xe4
#define LOOP_COUNT 50

static uint32_t counter;   /* in .bss: a reloaded image starts again from 0 */

int main(void)
{
    puts("loop start\n");
    for (counter = 0; counter < LOOP_COUNT; counter++)
        outl(LOOP_PORT, counter);
    puts("loop end\n");
    return VERDICT_PASS;
}
