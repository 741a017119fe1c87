/* The example on a Cortex-M through Arm semihosting: files and the console
 * are the host's (QEMU's, or a debug probe's), so the same example reads
 * sample files from the PC. No stdio: newlib's would bring malloc and ~20 KB
 * of flash.
 *
 * Instructions are counted with QEMU's -icount (shift 0: one instruction is
 * one nanosecond of virtual time) read through SysTick, which mps2-an386
 * clocks at 25 MHz: one tick per 40 instructions. On a real board the same
 * count is cycles / 25 MHz * 1e9 and means time, not instructions. */
#include <string.h>

#include "../example/platform.h"

#define SYS_OPEN 0x01
#define SYS_CLOSE 0x02
#define SYS_WRITE 0x05
#define SYS_READ 0x06
#define SYS_SEEK 0x0A
#define SYS_FLEN 0x0C
#define SYS_GET_CMDLINE 0x15
#define SYS_EXIT 0x18

#define NS_PER_TICK 40u   /* mps2-an386's 25 MHz SYSCLK, with -icount shift=0 */

uint32_t startup_stack_peak(void);
uint32_t startup_static_ram(void);
int example_main(void);

static int semihost(int op, const void *argument) {
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = argument;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void semihost_exit(int status) {
    /* ADP_Stopped_ApplicationExit ends QEMU with status 0; RunTimeErrorUnknown with 1 */
    semihost(SYS_EXIT, (const void *)(uintptr_t)(status == 0 ? 0x20026u : 0x20023u));
}

static int console_out = -1, console_err = -1;

static int open_path(const char *path, int mode) {
    uint32_t block[3];
    block[0] = (uint32_t)(uintptr_t)path;
    block[1] = (uint32_t)mode;
    block[2] = (uint32_t)strlen(path);
    return semihost(SYS_OPEN, block);
}

static void write_all(int handle, const char *text) {
    uint32_t block[3];
    if (handle < 0) return;
    block[0] = (uint32_t)handle;
    block[1] = (uint32_t)(uintptr_t)text;
    block[2] = (uint32_t)strlen(text);
    semihost(SYS_WRITE, block);
}

/* A file handle lives in the pointer: semihosting handles are small integers. */
void *platform_open(const char *path, platform_mode mode) {
    int handle;
    if (mode == PLATFORM_READ) handle = open_path(path, 1);          /* "rb" */
    else if (mode == PLATFORM_CREATE) handle = open_path(path, 7);   /* "w+b" */
    else {
        handle = open_path(path, 3);                                 /* "r+b", or create it */
        if (handle < 0) handle = open_path(path, 7);
    }
    return handle < 0 ? NULL : (void *)(uintptr_t)(handle + 1);
}

static int handle_of(void *file) { return (int)((uintptr_t)file - 1u); }

static int seek(void *file, uint32_t offset) {
    uint32_t block[2];
    block[0] = (uint32_t)handle_of(file);
    block[1] = offset;
    return semihost(SYS_SEEK, block) == 0 ? 0 : -1;
}

int platform_read(void *file, uint32_t offset, void *buffer, uint32_t length) {
    uint32_t block[3];
    if (seek(file, offset)) return -1;
    block[0] = (uint32_t)handle_of(file);
    block[1] = (uint32_t)(uintptr_t)buffer;
    block[2] = length;
    return semihost(SYS_READ, block) == 0 ? 0 : -1;   /* the count of bytes not read */
}

int platform_write(void *file, uint32_t offset, const void *buffer, uint32_t length) {
    uint32_t block[3];
    if (seek(file, offset)) return -1;
    block[0] = (uint32_t)handle_of(file);
    block[1] = (uint32_t)(uintptr_t)buffer;
    block[2] = length;
    return semihost(SYS_WRITE, block) == 0 ? 0 : -1;  /* the count of bytes not written */
}

int platform_sync(void *file) {
    (void)file;   /* semihosting writes go straight to the host's file */
    return 0;
}

long platform_size(void *file) {
    uint32_t block[1];
    block[0] = (uint32_t)handle_of(file);
    return semihost(SYS_FLEN, block);
}

void platform_close(void *file) {
    uint32_t block[1];
    block[0] = (uint32_t)handle_of(file);
    semihost(SYS_CLOSE, block);
}

void platform_print(const char *text) { write_all(console_out, text); }
void platform_error(const char *text) { write_all(console_err, text); }
const char *platform_name(void) { return "cortex-m4"; }
double platform_seconds(void) { return -1.0; }
size_t platform_stack_peak(void) { return startup_stack_peak(); }
size_t platform_static_ram(void) { return startup_static_ram(); }

static char command_line[2048];
static char *arguments[40];
static int argument_count;

void platform_args(int *argc, char ***argv) {
    uint32_t block[2];
    char *p = command_line;
    argument_count = 0;
    block[0] = (uint32_t)(uintptr_t)command_line;
    block[1] = sizeof command_line - 1;
    if (semihost(SYS_GET_CMDLINE, block) == 0) {
        command_line[block[1] < sizeof command_line ? block[1] : sizeof command_line - 1] = '\0';
        while (*p && argument_count < (int)(sizeof arguments / sizeof arguments[0])) {
            while (*p == ' ') *p++ = '\0';
            if (!*p) break;
            arguments[argument_count++] = p;
            while (*p && *p != ' ') p++;
        }
    }
    *argc = argument_count;
    *argv = arguments;
}

/* ---- SysTick as a 64-bit counter of virtual nanoseconds */

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)

static volatile uint32_t wraps;

void SysTick_Handler(void) { wraps++; }

uint64_t platform_instructions(void) {
    uint32_t before, value;
    do {
        before = wraps;
        value = SYST_CVR;
    } while (before != wraps);
    return ((uint64_t)before * 0x1000000u + (0xFFFFFFu - value)) * NS_PER_TICK;
}

int semihost_main(void) {
    console_out = open_path(":tt", 4);   /* "w": standard output */
    console_err = open_path(":tt", 8);   /* "a": standard error */
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7u;   /* processor clock, interrupt on wrap, enabled */
    return example_main();
}
