/* Writes 0, 1, 2, ... to port 0xe4, one exit each: a guest whose progress the test can
 * watch (pause, reset) and time (exit round trips).  The count is 50 unless port 0xe5
 * answers another (an unhandled read gives all-ones, i.e. the default). */
#include "lib.h"

#define LOOP_PORT 0xe4
#define COUNT_PORT 0xe5
#define LOOP_COUNT 50

static uint32_t counter;   /* in .bss: a reloaded image starts again from 0 */

int main(void)
{
    uint32_t n = inl(COUNT_PORT);

    if (n == 0xffffffffu)
        n = LOOP_COUNT;
    puts("loop start\n");
    for (counter = 0; counter < n; counter++)
        outl(LOOP_PORT, counter);
    puts("loop end\n");
    return VERDICT_PASS;
}
