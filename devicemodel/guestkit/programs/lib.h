/* Tiny freestanding runtime for the guest test programs (no libc). */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H
#include <stdint.h>

#define COM1 0x3f8
#define VERDICT_PASS 0x01

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t mmio_read32(uintptr_t a) { return *(volatile uint32_t *)a; }
static inline void mmio_write32(uintptr_t a, uint32_t v) { *(volatile uint32_t *)a = v; }

void putc(char c);
void puts(const char *s);          /* one `rep outsb` for the whole string */
void put_hex(uint32_t v, int digits);
uint32_t pci_read32(int bus, int dev, int func, int reg);
void pci_write32(int bus, int dev, int func, int reg, uint32_t v);
void idt_set(int vector, void (*stub)(void));
void idt_load(void);
void irq_handler(int vector);
#endif
