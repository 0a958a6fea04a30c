/* The other side of bench/ioreq.py --backend acrn-fake, at C speed.
 *
 * poster:    a guest vCPU, the hypervisor and the HSM's dispatch (acrn-facts §1.5 steps
 *            1-2): fill slot 0 with a PIO read of port 0x3F9, PENDING, then PROCESSING
 *            with kernel_handled 0, mark the client's pending flag and wake ATTACH; then
 *            sleep until NOTIFY_REQUEST_FINISH wakes the vCPU (or, with "poll", spin on
 *            the state as the hypervisor does for a completion-polling VM); take the
 *            value, FREE.  Prints each round trip in nanoseconds, one per line.
 * responder: the floor: a device model reduced to ATTACH, find the slot, write a value,
 *            NOTIFY, with the same fake ATTACH/NOTIFY as the Python side's.
 *
 * Shared with the Python side through inherited fds: a memfd (page 0: the request page;
 * page 1: one pending byte per vCPU at 0, the "client destroyed" byte at 64), the ATTACH
 * eventfd, the completion eventfd.
 *
 *   fake_hsm poster <memfd> <attach_efd> <done_efd> <requests> <warmup> notify|poll [gap_us]
 *
 * gap_us: the guest computes that long (a busy loop, as a running vCPU) between two exits.
 *   fake_hsm responder <memfd> <attach_efd> <done_efd>
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define SLOT_TYPE 0
#define SLOT_REQS 64
#define SLOT_VALUE (SLOT_REQS + 24)
#define SLOT_KH 132
#define SLOT_STATE 136
#define PENDING 0
#define COMPLETE 1
#define PROCESSING 2
#define FREE 3
#define DESTROYED 64

static volatile uint8_t *page, *ctl;

static uint32_t load32(int off) { return __atomic_load_n((volatile uint32_t *)(page + off), __ATOMIC_ACQUIRE); }
static void store32(int off, uint32_t v) { __atomic_store_n((volatile uint32_t *)(page + off), v, __ATOMIC_RELEASE); }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void eventfd_add(int fd) {
    uint64_t one = 1;
    if (write(fd, &one, 8) != 8) { perror("eventfd write"); exit(1); }
}

static int eventfd_take(int fd) {
    uint64_t v;
    return read(fd, &v, 8) == 8;
}

static uint64_t one_request(int attach, int done, int poll) {
    uint64_t t0 = now_ns();
    /* hypervisor: the request, then PENDING */
    memset((void *)page, 0, SLOT_STATE);
    store32(SLOT_TYPE, 0);                      /* PORTIO */
    store32(SLOT_REQS + 0, 0);                  /* READ */
    *(volatile uint64_t *)(page + SLOT_REQS + 8) = 0x3F9;
    *(volatile uint64_t *)(page + SLOT_REQS + 16) = 1;
    store32(SLOT_STATE, PENDING);
    /* HSM dispatch: ours (kernel_handled 0), PROCESSING, pending bit, wake ATTACH */
    store32(SLOT_KH, 0);
    store32(SLOT_STATE, PROCESSING);
    __atomic_store_n(&ctl[0], 1, __ATOMIC_RELEASE);
    eventfd_add(attach);
    /* the vCPU waits for NOTIFY_REQUEST_FINISH */
    if (poll) {
        while (load32(SLOT_STATE) != COMPLETE)
            __builtin_ia32_pause();
    } else {
        do {
            if (!eventfd_take(done)) { perror("done eventfd"); exit(1); }
        } while (load32(SLOT_STATE) != COMPLETE);
    }
    if ((load32(SLOT_VALUE) & 0xFF) != 0x5A) { fprintf(stderr, "bad value\n"); exit(1); }
    store32(SLOT_STATE, FREE);
    return now_ns() - t0;
}

static void responder(int attach, int done) {
    for (;;) {
        /* ATTACH: sleep until a request is pending for us (or the client is gone) */
        while (!__atomic_load_n(&ctl[0], __ATOMIC_ACQUIRE)) {
            if (ctl[DESTROYED]) return;
            eventfd_take(attach);
        }
        if (ctl[DESTROYED]) return;
        if (load32(SLOT_STATE) == PROCESSING && !load32(SLOT_KH)) {
            store32(SLOT_VALUE, 0x5A);
            /* NOTIFY_REQUEST_FINISH: clear the pending bit, COMPLETE, wake the vCPU */
            __atomic_store_n(&ctl[0], 0, __ATOMIC_RELEASE);
            store32(SLOT_STATE, COMPLETE);
            eventfd_add(done);
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: see the comment at the top of fake_hsm.c\n");
        return 2;
    }
    int memfd = atoi(argv[2]), attach = atoi(argv[3]), done = atoi(argv[4]);
    uint8_t *map = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (map == MAP_FAILED) { perror("mmap"); return 1; }
    page = map;
    ctl = map + 4096;
    if (!strcmp(argv[1], "responder")) {
        responder(attach, done);
        return 0;
    }
    if (strcmp(argv[1], "poster") || argc < 8) return 2;
    long n = atol(argv[5]), warm = atol(argv[6]);
    int poll = !strcmp(argv[7], "poll");
    uint64_t gap = argc > 8 ? strtoull(argv[8], NULL, 10) * 1000 : 0;
    uint64_t *t = calloc(n, sizeof *t);
    for (long i = 0; i < warm + n; i++) {
        uint64_t took = one_request(attach, done, poll);
        if (i >= warm) t[i - warm] = took;
        for (uint64_t until = now_ns() + gap; gap && now_ns() < until;)
            __builtin_ia32_pause();
    }
    for (long i = 0; i < n; i++) printf("%llu\n", (unsigned long long)t[i]);
    return 0;
}
