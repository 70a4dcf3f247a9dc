/* Monotonic wall-clock seconds. */
#ifndef M1C_TIMER_H
#define M1C_TIMER_H

double m1c_now(void);

#endif
