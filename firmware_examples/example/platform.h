/* What the example needs from the machine it runs on: files, a console, a
 * counter. platform_host.c is a PC (stdio); ../cortex-m4/platform_semihost.c
 * is a Cortex-M under a debugger or QEMU, through Arm semihosting. */
#ifndef EXAMPLE_PLATFORM_H
#define EXAMPLE_PLATFORM_H

#include <stddef.h>
#include <stdint.h>

typedef enum { PLATFORM_READ = 0, PLATFORM_CREATE = 1, PLATFORM_UPDATE = 2 } platform_mode;

/* A file handle, or NULL if it cannot be opened (PLATFORM_UPDATE creates a missing file). */
void *platform_open(const char *path, platform_mode mode);
int platform_read(void *file, uint32_t offset, void *buffer, uint32_t length);        /* 0 on success */
int platform_write(void *file, uint32_t offset, const void *buffer, uint32_t length); /* 0 on success */
int platform_sync(void *file);
long platform_size(void *file);
void platform_close(void *file);

void platform_print(const char *text);     /* standard output */
void platform_error(const char *text);     /* standard error: progress and errors */

/* The command line (the host's argv; the debugger's or QEMU's on a board). */
void platform_args(int *argc, char ***argv);
const char *platform_name(void);
/* Instructions executed so far (QEMU -icount), or 0 where nothing counts them. */
uint64_t platform_instructions(void);
/* Seconds of CPU time, or -1 where there is no clock. */
double platform_seconds(void);
/* Bytes of stack used so far (measured by painting), or 0 where unknown. */
size_t platform_stack_peak(void);
/* Bytes of static RAM (.data and .bss), or 0 where unknown. */
size_t platform_static_ram(void);

#endif
