//go:build goexperiment.jsonv2

package main

// lk-jwt-service 0.5.0 was built without this experiment; v1 emulated on v2 may differ.
const jsonImplementation = "encoding/json on json/v2 (GOEXPERIMENT=jsonv2): not what lk-jwt-service 0.5.0 runs"
