/* The example on a PC: files through stdio, fsync where POSIX has it. */
#if !defined(_WIN32)
#define _POSIX_C_SOURCE 200809L
#define _FILE_OFFSET_BITS 64
#include <sys/types.h>
#include <unistd.h>
#else
#include <io.h>
#endif
#include <stdio.h>
#include <time.h>

/* 64-bit file offsets where long is 32 bits (Windows, 32-bit Linux): scratch files pass 2 GB */
#if defined(_WIN32)
#define SEEK_TO(file, offset, whence) _fseeki64(file, (__int64)(offset), whence)
#define TELL(file) _ftelli64(file)
#else
#define SEEK_TO(file, offset, whence) fseeko(file, (off_t)(offset), whence)
#define TELL(file) ftello(file)
#endif

#include "platform.h"

static int global_argc;
static char **global_argv;

void platform_set_args(int argc, char **argv) {
    global_argc = argc;
    global_argv = argv;
}

void platform_args(int *argc, char ***argv) {
    *argc = global_argc;
    *argv = global_argv;
}

void *platform_open(const char *path, platform_mode mode) {
    FILE *file;
    if (mode == PLATFORM_READ) return fopen(path, "rb");
    if (mode == PLATFORM_CREATE) return fopen(path, "w+b");
    file = fopen(path, "r+b");
    if (!file) file = fopen(path, "w+b");
    return file;
}

int platform_read(void *file, uint32_t offset, void *buffer, uint32_t length) {
    if (SEEK_TO((FILE *)file, offset, SEEK_SET)) return -1;
    return fread(buffer, 1, length, (FILE *)file) == length ? 0 : -1;
}

int platform_write(void *file, uint32_t offset, const void *buffer, uint32_t length) {
    if (SEEK_TO((FILE *)file, offset, SEEK_SET)) return -1;
    return fwrite(buffer, 1, length, (FILE *)file) == length ? 0 : -1;
}

int platform_sync(void *file) {
    if (fflush((FILE *)file)) return -1;
#if defined(_WIN32)
    return _commit(_fileno((FILE *)file));
#else
    return fsync(fileno((FILE *)file));
#endif
}

long platform_size(void *file) {
    long long size;
    if (SEEK_TO((FILE *)file, 0, SEEK_END)) return -1;
    size = (long long)TELL((FILE *)file);
    return size > 0xFFFFFFFFll ? -1 : (long)size;   /* sample files are at most 4 GB (32-bit offsets) */
}

void platform_close(void *file) { fclose((FILE *)file); }
void platform_print(const char *text) { fputs(text, stdout); fflush(stdout); }
void platform_error(const char *text) { fputs(text, stderr); fflush(stderr); }
const char *platform_name(void) { return "host"; }
uint64_t platform_instructions(void) { return 0; }
double platform_seconds(void) { return (double)clock() / CLOCKS_PER_SEC; }
size_t platform_stack_peak(void) { return 0; }
size_t platform_static_ram(void) { return 0; }

int example_main(void);

int main(int argc, char **argv) {
    platform_set_args(argc, argv);
    return example_main();
}
