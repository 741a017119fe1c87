/* Reset and the vector table for a Cortex-M4, in C.
 *
 * Written here rather than taken from the CMSIS startup file among the
 * toolchain's examples: that one needs a device's SystemInit, which must
 * also turn the FPU on, and a linker script with its symbol names. This one
 * is the whole of what the example needs: copy .data, clear .bss, paint the
 * stack to measure it, enable the FPU, start the instruction counter, and
 * call the example. */
#include <stdint.h>

extern uint32_t __data_load, __data_start, __data_end, __bss_start, __bss_end, __stack_top, __stack_limit;

int semihost_main(void);
void semihost_exit(int status);
void SysTick_Handler(void);

#define STACK_PAINT 0xC5C5C5C5u

void Reset_Handler(void) __attribute__((noreturn));
void Reset_Handler(void) {
    /* the linker's symbols are addresses of different objects: compare them as integers */
    uintptr_t src = (uintptr_t)&__data_load, dst, end, sp;
    for (dst = (uintptr_t)&__data_start, end = (uintptr_t)&__data_end; dst < end; dst += 4, src += 4)
        *(uint32_t *)dst = *(const uint32_t *)src;
    for (dst = (uintptr_t)&__bss_start, end = (uintptr_t)&__bss_end; dst < end; dst += 4) *(uint32_t *)dst = 0;
    /* paint from the bottom of RAM's free part up to just below this frame */
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    for (dst = (uintptr_t)&__bss_end; dst < sp - 64u; dst += 4) *(uint32_t *)dst = STACK_PAINT;
    /* CP10 and CP11 full access: the FPU (SCB->CPACR) */
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    semihost_exit(semihost_main());
    for (;;) {
    }
}

static void fault(void) {
    semihost_exit(3);
    for (;;) {
    }
}

void NMI_Handler(void) { fault(); }
void HardFault_Handler(void) { fault(); }

typedef void (*vector)(void);

__attribute__((section(".vectors"), used)) static const vector vectors[16] = {
    (vector)(uintptr_t)&__stack_top,
    Reset_Handler,
    NMI_Handler,
    HardFault_Handler,
    fault, /* MemManage */
    fault, /* BusFault */
    fault, /* UsageFault */
    0, 0, 0, 0,
    fault, /* SVCall */
    fault, /* DebugMonitor */
    0,
    fault, /* PendSV */
    SysTick_Handler,
};

/* the lowest address the stack reached: the first word the painting lost */
uint32_t startup_stack_peak(void) {
    uintptr_t p = (uintptr_t)&__bss_end, top = (uintptr_t)&__stack_top;
    while (p < top && *(const uint32_t *)p == STACK_PAINT) p += 4;
    return (uint32_t)(top - p);
}

uint32_t startup_static_ram(void) { return (uint32_t)((uintptr_t)&__bss_end - (uintptr_t)&__data_start); }
