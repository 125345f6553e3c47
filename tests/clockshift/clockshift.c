/* clockshift: moves a process's wall clock (CLOCK_REALTIME, gettimeofday, time) by the number of
 * seconds written in the file named by $CLOCKSHIFT_FILE, read again at most every 50 ms of
 * monotonic time. The monotonic clocks are left alone, so timers and timeouts run as before.
 *
 * Loaded with LD_PRELOAD into the Envoy under test, it lets a test show what the guard does an
 * hour later without waiting an hour. It calls the kernel directly and never allocates: Envoy's
 * allocator asks for the time while it starts, before any dynamic lookup could be made. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long long offset_seconds;
static long long checked_at_ns = -1;

static long long monotonic_ns(void) {
    struct timespec ts;
    if (syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts) != 0) return 0;
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The offset in the file: an optional sign and decimal digits; anything else counts as 0. */
static long long read_offset(const char *path) {
    char buf[32];
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    long n = syscall(SYS_read, fd, buf, sizeof buf - 1);
    syscall(SYS_close, fd);
    if (n <= 0) return 0;
    buf[n] = '\0';
    long long value = 0;
    int i = 0, negative = 0;
    if (buf[0] == '-' || buf[0] == '+') {
        negative = buf[0] == '-';
        i = 1;
    }
    for (; buf[i] >= '0' && buf[i] <= '9'; i++) value = value * 10 + (buf[i] - '0');
    return negative ? -value : value;
}

static long long offset(void) {
    const char *path = getenv("CLOCKSHIFT_FILE");
    if (path == NULL) return 0;
    long long now = monotonic_ns();
    long long checked = __atomic_load_n(&checked_at_ns, __ATOMIC_RELAXED);
    if (checked < 0 || now - checked > 50000000LL) {
        __atomic_store_n(&offset_seconds, read_offset(path), __ATOMIC_RELAXED);
        __atomic_store_n(&checked_at_ns, now, __ATOMIC_RELAXED);
    }
    return __atomic_load_n(&offset_seconds, __ATOMIC_RELAXED);
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    long r = syscall(SYS_clock_gettime, clock, ts);
    if (r == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE)) {
        ts->tv_sec += offset();
    }
    return (int)r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    (void)tz;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return (time_t)-1;
    if (out != NULL) *out = ts.tv_sec;
    return ts.tv_sec;
}
