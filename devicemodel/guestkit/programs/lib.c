#include "lib.h"

static uint64_t idt[256];

void putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20))   /* LSR: transmitter holding register empty */
        ;
    outb(COM1, (uint8_t)c);
}

void puts(const char *s)
{
    uint32_t n = 0;
    while (s[n])
        n++;
    __asm__ volatile("cld; rep outsb" : "+S"(s), "+c"(n) : "d"(COM1) : "memory");
}

void put_hex(uint32_t v, int digits)
{
    for (int i = digits - 1; i >= 0; i--)
        putc("0123456789abcdef"[(v >> (4 * i)) & 0xf]);
}

static uint32_t cf8(int bus, int dev, int func, int reg)
{
    return 0x80000000u | ((uint32_t)bus << 16) | ((uint32_t)dev << 11) | ((uint32_t)func << 8)
           | ((uint32_t)reg & 0xfc);
}

uint32_t pci_read32(int bus, int dev, int func, int reg)
{
    outl(0xcf8, cf8(bus, dev, func, reg));
    return inl(0xcfc);
}

void pci_write32(int bus, int dev, int func, int reg, uint32_t v)
{
    outl(0xcf8, cf8(bus, dev, func, reg));
    outl(0xcfc, v);
}

void idt_set(int vector, void (*stub)(void))
{
    uint32_t off = (uint32_t)stub;
    /* 32-bit interrupt gate, present, DPL 0, selector 0x08 */
    idt[vector] = (uint64_t)(off & 0xffff) | ((uint64_t)0x08 << 16) | ((uint64_t)0x8e00 << 32)
                  | ((uint64_t)(off >> 16) << 48);
}

void idt_load(void)
{
    struct __attribute__((packed)) { uint16_t limit; uint32_t base; } d = {
        sizeof(idt) - 1, (uint32_t)idt };
    __asm__ volatile("lidt %0" :: "m"(d));
}

/* programs that take interrupts define their own */
__attribute__((weak)) void irq_handler(int vector)
{
    (void)vector;
}
