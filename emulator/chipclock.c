/* The chip's clock for a VM at chip speed: LD_PRELOADed into the unix port.
 *
 * The throttle (throttle.py) runs the VM in bursts of ~300 us and then stops it for
 * the chip's extra time. Inside a burst the host's CLOCK_MONOTONIC moves 0.3 ms
 * while the VM does ~70 ms of the chip's work, so a task that yields by the clock
 * (every 12 ms) held the loop for a whole burst. Here CLOCK_MONOTONIC, which
 * the unix port's ticks read, runs as the chip's would: the host's time plus
 * (factor - 1) x the CPU the VM used since the throttle last caught up with it,
 * less the host's own cost of each time it was scheduled in, as the throttle
 * charges it. The throttle keeps the VM stopped until the host's time reaches the
 * chip's, then rebases this page, so the chip's clock is continuous.
 *
 * What the VM sends on a socket (write, send, sendto, sendmsg) waits until the
 * host's time has caught up with the chip's: inside a burst the VM is ahead of the
 * world, and a packet sent then left up to a burst of chip time early (an SNTP
 * request sent early skews the node's clock by half of that; an event reached the
 * broker sooner than the chip could send it). The wait costs no chip time: the
 * throttle's stop pays for work already done. The chip's own wires (the emulator's
 * bus and I2S sockets, SO_PRIORITY INTERNAL_PRIORITY: board_side/emu_link.py) and
 * files do not wait.
 *
 * A look at the clock works the chip's time out from the VM's CPU: a CPU clock and a
 * read of schedstat, three system calls, ~3 us of the host's CPU. That is counted apart
 * (as a driver's, below) and the chip charged its own ticks' ~1 us instead: charged at
 * the factor, each look cost the chip 0.3-0.5 ms at x160, and asyncio looks several
 * times at every task switch. What is left of a look is the edges of the system calls
 * (~60 us of chip time with the Python call; tests/test_chip_speed.py).
 *
 * The page (CITYNODE_CHIP_CLOCK, a file the throttle writes) is read under a
 * sequence count: the throttle may rebase it while the VM runs. Other clocks, and
 * other threads, are the host's.
 *
 * The heap's collections are counted here too, into the same file at COLLECTIONS_AT
 * (the VM writes, the emulator reads): the unix port is a CPython extension that calls
 * gc_collect through its PLT, the allocator's calls included, so this library's
 * gc_collect stands in front of it. A collection is C walking memory, not bytecode:
 * its chip time is modelled from what it walked (the heap swept plus the words
 * marked, at the chip's published rate: gc_ns_per_byte), not from the host's CPU at the
 * interpreter's factor, which read 10-30x the chip's (docs/decisions.md, "A collection
 * of the heap at chip speed"). The throttle lets a collection finish before it stops
 * the VM (`busy`), then charges the model instead of the CPU it took. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

struct page {                 /* throttle.py, ChipClockPage: the same layout */
    volatile int64_t seq;     /* odd while the throttle writes */
    volatile int64_t offset_ns;       /* chip - host at the rebase */
    volatile int64_t cpu0_ns;         /* the VM's CPU time (schedstat) at the rebase */
    volatile int64_t switches0;       /* times scheduled in (schedstat) at the rebase */
    volatile int64_t switch_ns;       /* the host's cost of each, not the chip's */
    volatile double gain;             /* (factor - 1) x the user share; 0: host time */
    volatile double gc_ns_per_byte;   /* a collection's chip ns per heap byte; 0: none */
    volatile int64_t gc_cpu0_ns;      /* collections' host CPU at the rebase */
    volatile int64_t gc_chip0_ns;     /* collections' chip time at the rebase */
};

struct collections {           /* throttle.py, ChipClock.collections: the same layout */
    volatile int64_t count;
    volatile int64_t cpu_ns;          /* the host CPU they took, in all */
    volatile int64_t longest_ns;
    volatile int64_t chip_ns;         /* their chip time, modelled, in all */
    volatile int64_t chip_longest_ns;
    volatile int64_t busy;            /* 1 while one runs */
    /* The chip's drivers: the board side's stand-ins for the ESP32 port's C (the I2S
     * DMA copy, a bus transaction's driver call) are Python here, and charged as
     * interpreted code they cost the chip ~100x what its C does. The board side marks
     * such work (board_side/emu_drivers.py): in_driver set, a clock read, the work, the
     * chip's time for it in driver_model_ns, in_driver cleared, a clock read. Its CPU
     * is then counted apart and the model charged instead, as for a collection. */
    volatile int64_t driver_calls;
    volatile int64_t driver_cpu_ns;   /* the host CPU they took, in all */
    volatile int64_t driver_chip_ns;  /* their chip time, modelled, in all */
    volatile int32_t in_driver;       /* the board side writes these two (a depth) */
    volatile int32_t driver_model_ns;
    volatile int64_t wait_cpu_ns;     /* of driver_cpu_ns, the kernel's for the waits */
};

/* py/gc.h gc_info_t begins with these; room for the rest */
struct gc_info {
    size_t total;
    size_t used;
    size_t rest[14];
};

#define COLLECTIONS_AT 512            /* bytes into the file */
#define INTERNAL_PRIORITY 6         /* board_side/emu_link.py, emu_machine.py */
#define SEND_SLACK_NS 1000000       /* ahead by at most this, a send goes now */
#define SEND_WAIT_MAX_NS 2000000000 /* a throttle that never catches up: go anyway */
#define CLOCK_READ_CHIP_NS 1000     /* the chip's ticks: esp_timer_get_time(), ~1 us */
#define TICK_NS 10000000            /* FreeRTOS's tick: ESP-IDF's CONFIG_FREERTOS_HZ 100 */

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_send)(int, const void *, size_t, int);
static ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *,
                              socklen_t);
static ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
static int (*real_poll)(struct pollfd *, nfds_t, int);
static struct page *page;
static struct collections *collections;
static void (*real_gc_collect)(void);
static void (*real_gc_info)(struct gc_info *);
static int stat_fd = -1;
static pthread_t main_thread;
static int64_t look_ns;             /* the host's CPU for a look at a CPU clock */
static int64_t last_ns;
static int in_driver;               /* a driver's work has begun: its CPU from ... */
static int64_t driver_cpu0;         /* ... this thread CPU time */

static int64_t ns_of(const struct timespec *ts)
{
    return (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
}

/* A system call's CPU from one look at the thread's CPU clock to the next: the least of
 * a few, as each look is one. */
static int64_t cpu_look_ns(void)
{
    struct timespec a, b;
    int64_t least = 0;
    for (int i = 0; i < 16; i++) {
        real_clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
        real_clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
        int64_t d = ns_of(&b) - ns_of(&a);
        if (i == 0 || d < least)
            least = d;
    }
    return least;
}

static void forked_child(void)
{
    page = NULL;                        /* the parent's clock, not this process's */
}

__attribute__((constructor)) static void chipclock_init(void)
{
    real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    real_write = dlsym(RTLD_NEXT, "write");
    real_send = dlsym(RTLD_NEXT, "send");
    real_sendto = dlsym(RTLD_NEXT, "sendto");
    real_sendmsg = dlsym(RTLD_NEXT, "sendmsg");
    real_poll = dlsym(RTLD_NEXT, "poll");
    const char *path = getenv("CITYNODE_CHIP_CLOCK");
    if (!path)
        return;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return;
    void *p = mmap(NULL, COLLECTIONS_AT + sizeof(struct collections),
                   PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        return;
    collections = (struct collections *)((char *)p + COLLECTIONS_AT);
    char at[24];                        /* where the board side marks a driver's work */
    snprintf(at, sizeof at, "%lld", (long long)(intptr_t)&collections->in_driver);
    setenv("CITYNODE_CHIP_DRIVERS", at, 1);
    stat_fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
    if (stat_fd < 0)
        return;
    main_thread = pthread_self();
    look_ns = cpu_look_ns();
    pthread_atfork(NULL, NULL, forked_child);
    page = p;
}

/* CPU ns and times scheduled in, of this thread, as the throttle reads them for the
 * process when it is stopped (/proc/PID/schedstat). The CPU time comes from the
 * thread's CPU clock: schedstat's own is brought up to date only when the thread
 * leaves its CPU. */
static int read_cpu(int64_t *cpu, int64_t *switches)
{
    struct timespec ts;
    if (real_clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts))
        return -1;
    *cpu = ns_of(&ts);
    char buf[96];
    ssize_t n = pread(stat_fd, buf, sizeof buf - 1, 0);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *end;
    strtoll(buf, &end, 10);             /* CPU time, as of the last switch */
    strtoll(end, &end, 10);             /* time waiting for a CPU */
    *switches = strtoll(end, NULL, 10);
    return 0;
}

/* How far the chip's clock is ahead of the host's, by the page now. *cpu_read (if
 * given): the thread's CPU time it read, -1 if none or the model is off. */
static int64_t ahead(int64_t *cpu_read)
{
    int64_t seq, offset, cpu0, switches0, switch_ns, cpu, switches, gc_cpu0, gc_chip0;
    double gain, gc_ns_per_byte;
    do {
        seq = __atomic_load_n(&page->seq, __ATOMIC_ACQUIRE);
        offset = page->offset_ns;
        cpu0 = page->cpu0_ns;
        switches0 = page->switches0;
        switch_ns = page->switch_ns;
        gain = page->gain;
        gc_ns_per_byte = page->gc_ns_per_byte;
        gc_cpu0 = page->gc_cpu0_ns;
        gc_chip0 = page->gc_chip0_ns;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
    } while ((seq & 1) || seq != __atomic_load_n(&page->seq, __ATOMIC_ACQUIRE));
    int64_t by = offset;
    if (cpu_read)
        *cpu_read = -1;
    if (gain > 0 && read_cpu(&cpu, &switches) == 0) {
        int64_t used = (cpu - cpu0) - (switches - switches0) * switch_ns;
        if (gc_ns_per_byte > 0) {   /* collections and drivers since: their model */
            int64_t gc_cpu = collections->cpu_ns + collections->driver_cpu_ns - gc_cpu0;
            used -= gc_cpu;
            by += collections->chip_ns + collections->driver_chip_ns - gc_chip0 - gc_cpu;
            if (cpu_read)
                *cpu_read = cpu;
        }
        if (used > 0)
            by += (int64_t)(gain * (double)used);
    }
    return by;
}

/* The VM's own thread (no system call: a look at the clock must cost the chip little). */
static int on_chip_time(void)
{
    return page && pthread_equal(pthread_self(), main_thread);
}

/* The CPU this thread used since *since (updated): counted apart, as a driver's with
 * no chip time, so it is none of the chip's work (a send's wait, a look at the clock). */
static void not_chip_work(int64_t *since)
{
    struct timespec ts;
    if (real_clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts))
        return;
    int64_t took = ns_of(&ts) - *since;
    collections->driver_cpu_ns += took;
    driver_cpu0 += took;                /* in a driver's work: not its CPU too */
    *since = ns_of(&ts);
}

/* A driver's work begun or ended (the board side's mark, seen at its clock read). */
static void driver_mark(void)
{
    struct timespec ts;
    if (real_clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts))
        return;
    if (!in_driver) {
        driver_cpu0 = ns_of(&ts);
        in_driver = 1;
        return;
    }
    in_driver = 0;
    collections->driver_calls += 1;
    collections->driver_cpu_ns += ns_of(&ts) - driver_cpu0;
    collections->driver_chip_ns += collections->driver_model_ns;
}

int clock_gettime(clockid_t clk, struct timespec *ts)
{
    if (!real_clock_gettime)
        real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real_clock_gettime(clk, ts);
    if (rc || clk != CLOCK_MONOTONIC || !on_chip_time())
        return rc;
    if ((collections->in_driver != 0) != in_driver) {
        driver_mark();  /* the board side's mark: it reads no time from this, so the */
        return 0;       /* chip's (a read of schedstat: ~4 us of CPU) is not worked out */
    }
    int64_t now = ns_of(ts), cpu_read;
    now += ahead(&cpu_read);
    if (cpu_read >= 0) {        /* the look itself is not the chip's work (above) */
        cpu_read -= look_ns;
        not_chip_work(&cpu_read);
        collections->driver_chip_ns += CLOCK_READ_CHIP_NS;
    }
    if (now < last_ns)        /* never backwards: a rebase may land a little behind */
        now = last_ns;
    last_ns = now;
    ts->tv_sec = now / 1000000000;
    ts->tv_nsec = now % 1000000000;
    return 0;
}

/* Before the world sees anything from the VM: wait for the throttle's stop to bring
 * the host's time up to the chip's (it rebases the page when it has). The wait's own
 * CPU (a look at the clock and a nap, every 200 us) is not the chip's: charged at the
 * factor, each look put the chip ~2 ms further ahead, so a send waited 10-85 ms of real
 * time, and as much of the chip's, after a 100 ms sleep (SNTP's request, each publish). */
static void catch_up(void)
{
    struct timespec ts;
    real_clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    int64_t cpu = ns_of(&ts);
    real_clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t start = ns_of(&ts), owed;
    while ((owed = ahead(NULL)) > SEND_SLACK_NS) {
        real_clock_gettime(CLOCK_MONOTONIC, &ts);
        if (ns_of(&ts) - start > SEND_WAIT_MAX_NS)
            break;
        struct timespec nap = {0, owed < 200000 ? owed : 200000};
        nanosleep(&nap, NULL);
        not_chip_work(&cpu);
    }
    not_chip_work(&cpu);
}

/* Whether socket `fd` leads out of the chip: not one of its own wires. */
static int leaves_chip(int fd)
{
    int priority = 0;
    socklen_t len = sizeof priority;
    if (getsockopt(fd, SOL_SOCKET, SO_PRIORITY, &priority, &len))
        return 0;
    return priority != INTERNAL_PRIORITY;
}

ssize_t write(int fd, const void *buf, size_t n)
{
    struct stat st;
    if (on_chip_time() && fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode) && leaves_chip(fd))
        catch_up();
    return real_write(fd, buf, n);
}

ssize_t send(int fd, const void *buf, size_t n, int flags)
{
    if (on_chip_time() && leaves_chip(fd))
        catch_up();
    return real_send(fd, buf, n, flags);
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *to,
               socklen_t len)
{
    if (on_chip_time() && leaves_chip(fd))
        catch_up();
    return real_sendto(fd, buf, n, flags, to, len);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    if (on_chip_time() && leaves_chip(fd))
        catch_up();
    return real_sendmsg(fd, msg, flags);
}

/* The CPU this thread used since `since`, less the switch_ns the throttle forgives for
 * each of `wakes` times it was scheduled in: counted apart, as not_chip_work does. */
static void not_chip_wake(int64_t since, int wakes)
{
    struct timespec ts;
    if (real_clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts))
        return;
    int64_t took = ns_of(&ts) - since - wakes * page->switch_ns;
    if (took > 0) {
        collections->driver_cpu_ns += took;
        collections->wait_cpu_ns += took;
        driver_cpu0 += took;            /* in a driver's work: not its CPU too */
    }
}

/* Whether the UART (the VM's stdin, fd 0) is among the ready: its interrupt wakes the
 * chip's main task at once (machine_uart.c, usb_serial_jtag.c). */
static int uart_ready(const struct pollfd *fds, nfds_t n)
{
    for (nfds_t i = 0; i < n; i++)
        if (fds[i].fd == 0 && fds[i].revents)
            return 1;
    return 0;
}

/* The node's waits (asyncio's, select.poll), as the chip's are. Two differences:
 * - The chip waits in FreeRTOS ticks: modselect.c waits with mp_event_wait_ms, which on
 *   the ESP32 port is ulTaskNotifyTake(pdFALSE, 1), a tick at most, then looks again;
 *   only the UART, pins and timers wake the task sooner (mp_hal_wake_main_task_from_isr),
 *   not the I2S or a socket. So a wait ends at the first tick after its timeout or after
 *   what it waits for is ready: 0-10 ms later than the host's poll returns.
 * - Waking costs the host 15-40 us of CPU in the kernel (more the longer it slept:
 *   caches gone cold), the chip some us; charged at the factor, a wake after a sleep of
 *   20 ms cost the chip ~10 ms. The call's CPU beyond switch_ns, which the throttle
 *   forgives each time the VM is scheduled in, is counted apart, as the tick's wait is,
 *   and in wait_cpu_ns, which the throttle takes out of the system time it discounts
 *   the rest by (its user share): so the wake no longer lands in the next turn, and the
 *   VM's time in all is charged as before. The VM's own code still runs slower after a
 *   sleep (cold caches): that is charged.
 * A driver's stand-in (in_driver) waits as the host does: the chip's is C. */
int poll(struct pollfd *fds, nfds_t n, int timeout)
{
    if (!real_poll)
        real_poll = dlsym(RTLD_NEXT, "poll");
    if (timeout == 0 || !on_chip_time() || page->gc_ns_per_byte <= 0 || collections->in_driver)
        return real_poll(fds, n, timeout);
    struct timespec ts;
    real_clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    int rc = real_poll(fds, n, timeout);
    not_chip_wake(ns_of(&ts), 1);
    if (rc < 0 || uart_ready(fds, n))
        return rc;
    real_clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    int64_t since = ns_of(&ts);
    real_clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t to_tick = (TICK_NS - (ns_of(&ts) + ahead(NULL)) % TICK_NS) % TICK_NS;
    if (to_tick > 0) {
        struct timespec nap = {0, to_tick};
        nanosleep(&nap, NULL);          /* the host's time is the chip's while it naps */
        if (rc > 0)
            rc = real_poll(fds, n, 0);  /* what is ready by the tick */
    }
    not_chip_wake(since, to_tick > 0);
    return rc;
}

void gc_collect(void);

/* The extension's gc_collect: found in the loaded objects, as dlsym(RTLD_NEXT) cannot
 * see into one CPython loaded with RTLD_LOCAL. */
static int find_gc_collect(struct dl_phdr_info *info, size_t size, void *unused)
{
    (void)size;
    (void)unused;
    if (!info->dlpi_name || !info->dlpi_name[0])
        return 0;
    void *lib = dlopen(info->dlpi_name, RTLD_NOLOAD | RTLD_LAZY);
    if (!lib)
        return 0;
    void *f = dlsym(lib, "gc_collect");
    void *i = dlsym(lib, "gc_info");
    dlclose(lib);
    if (!f || f == (void *)gc_collect)
        return 0;
    real_gc_collect = f;
    real_gc_info = i;
    return 1;
}

/* The chip's time for the collection just made: it swept the heap and marked what is
 * live (an upper bound: the chip's sweep stops at the highest block in use). */
static int64_t modelled_ns(void)
{
    double per_byte = page ? page->gc_ns_per_byte : 0;
    if (per_byte <= 0 || !real_gc_info)
        return 0;
    struct gc_info info = {0};
    real_gc_info(&info);
    return (int64_t)(per_byte * (double)(info.total + info.used));
}

void gc_collect(void)
{
    if (!real_gc_collect)
        dl_iterate_phdr(find_gc_collect, NULL);
    if (!real_gc_collect)
        return;                 /* not the unix port: nothing to collect */
    if (!collections) {
        real_gc_collect();
        return;
    }
    __atomic_store_n(&collections->busy, 1, __ATOMIC_RELEASE);
    struct timespec t0, t1;
    int timed = real_clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0) == 0;
    real_gc_collect();
    int64_t chip = modelled_ns();
    if (timed && real_clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1) == 0) {
        int64_t took = ns_of(&t1) - ns_of(&t0);
        collections->count += 1;
        collections->cpu_ns += took;
        driver_cpu0 += took;            /* in a driver's work: not its CPU too */
        collections->chip_ns += chip;
        if (took > collections->longest_ns)
            collections->longest_ns = took;
        if (chip > collections->chip_longest_ns)
            collections->chip_longest_ns = chip;
    }
    __atomic_store_n(&collections->busy, 0, __ATOMIC_RELEASE);
}
