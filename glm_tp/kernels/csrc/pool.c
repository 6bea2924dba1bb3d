/* A small thread pool for the GEMV calls: workers (and the caller, waiting for them) may spin for
 * GLM_TP_NATIVE_SPIN_US microseconds before they sleep on a condition variable. The default is 0: on a
 * 2-core machine shared with other work, a 50 us spin made back-to-back 0.5 MiB calls 3.5x slower (188 vs
 * 53 us per call, measured), as spinning threads keep cores from the threads the call waits for.
 * Each worker has its own generation counter: a call wakes only the workers it uses. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include "gemv.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#define MAX_THREADS 256

typedef struct {
    atomic_uint go; /* bumped by the caller for each call this worker takes part in */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int index;
} worker;

static worker workers[MAX_THREADS];
static int started;        /* workers 1..started exist */
static atomic_int pending; /* workers still running the current call */
static struct { range_fn fn; void *ctx; int64_t total, align; int nthreads; } task;
static long spin_ns = -1;
static pthread_mutex_t done_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void part(int i, int64_t *begin, int64_t *end) {
    const int64_t units = (task.total + task.align - 1) / task.align;
    *begin = units * i / task.nthreads * task.align;
    *end = units * (i + 1) / task.nthreads * task.align;
    if (*end > task.total) *end = task.total;
    if (*begin > *end) *begin = *end;
}

static void *work(void *arg) {
    worker *me = arg;
    unsigned seen = 0; /* go is 0 when the thread is created; a call may bump it before we get here */
    for (;;) {
        unsigned g = atomic_load_explicit(&me->go, memory_order_acquire);
        if (g == seen && spin_ns > 0) {
            const long until = now_ns() + spin_ns;
            for (int i = 0; g == seen; i++) {
                cpu_relax();
                g = atomic_load_explicit(&me->go, memory_order_acquire);
                if ((i & 63) == 63 && now_ns() > until) break;
            }
        }
        if (g == seen) {
            pthread_mutex_lock(&me->mu);
            while ((g = atomic_load_explicit(&me->go, memory_order_acquire)) == seen) pthread_cond_wait(&me->cv, &me->mu);
            pthread_mutex_unlock(&me->mu);
        }
        seen = g;
        int64_t begin, end;
        part(me->index, &begin, &end);
        if (begin < end) task.fn(task.ctx, begin, end);
        if (atomic_fetch_sub_explicit(&pending, 1, memory_order_acq_rel) == 1) { /* the last one out */
            pthread_mutex_lock(&done_mu);
            pthread_cond_signal(&done_cv);
            pthread_mutex_unlock(&done_mu);
        }
    }
    return 0;
}

static void forget_workers(void) { started = 0; } /* a forked child has none of the parent's threads */

static int start_workers(int want) {
    if (spin_ns < 0) {
        const char *s = getenv("GLM_TP_NATIVE_SPIN_US");
        spin_ns = (s ? atol(s) : 0) * 1000L;
        pthread_atfork(0, 0, forget_workers);
    }
    for (; started + 1 < want && started + 1 < MAX_THREADS; started++) {
        worker *w = &workers[started + 1];
        w->index = started + 1;
        atomic_store(&w->go, 0);
        pthread_mutex_init(&w->mu, 0);
        pthread_cond_init(&w->cv, 0);
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, work, w);
        pthread_attr_destroy(&attr);
        if (failed) break;
    }
    return started + 1;
}

void pool_run(int nthreads, range_fn fn, void *ctx, int64_t total, int64_t align) {
    if (nthreads > 1) nthreads = start_workers(nthreads) < nthreads ? started + 1 : nthreads;
    task.fn = fn, task.ctx = ctx, task.total = total, task.align = align, task.nthreads = nthreads;
    if (nthreads <= 1) {
        fn(ctx, 0, total);
        return;
    }
    atomic_store_explicit(&pending, nthreads - 1, memory_order_relaxed);
    for (int i = 1; i < nthreads; i++) {
        worker *w = &workers[i];
        pthread_mutex_lock(&w->mu); /* under the lock: a worker between its check and its wait sees it */
        atomic_fetch_add_explicit(&w->go, 1, memory_order_release);
        pthread_cond_signal(&w->cv);
        pthread_mutex_unlock(&w->mu);
    }
    int64_t begin, end;
    part(0, &begin, &end);
    fn(ctx, begin, end);
    /* the other parts end about when ours does: spin a little, then sleep (on a busy machine a worker may
     * be waiting for a core, and spinning would keep the core from it) */
    const long until = now_ns() + spin_ns;
    for (int i = 0; atomic_load_explicit(&pending, memory_order_acquire) > 0; i++) {
        cpu_relax();
        if ((i & 63) == 63 && now_ns() > until) {
            pthread_mutex_lock(&done_mu);
            while (atomic_load_explicit(&pending, memory_order_acquire) > 0) pthread_cond_wait(&done_cv, &done_mu);
            pthread_mutex_unlock(&done_mu);
        }
    }
}
