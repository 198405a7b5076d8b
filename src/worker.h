/*
 * worker.h: the launcher and the per-database workers that run the jobs
 */
#ifndef LOYALTY_WORKER_H
#define LOYALTY_WORKER_H

extern void WorkerInit(void);

#endif
